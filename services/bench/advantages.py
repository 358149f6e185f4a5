"""`proxmo bench advantages`: wall time of every advantage estimator on ALFWorld-shaped batches.

Baselines are measured in the same run, interleaved with the estimators (round robin, so
load from other processes hits all of them alike): GRPO on the same batch, and a plain
scikit-learn ``TfidfVectorizer(max_features=1024).fit`` of the same observations, which is
the cost the issue compares ProxMO against (target: ProxMO <= 1.5x that fit). A second
batch ``--scale`` times larger checks that time grows linearly (no N^2 blow-up);
``--distinct`` adds the worst case for ProxMO's state de-duplication (no repeated states).
The last line is ``proxmo_vs_tfidf_fit=<ratio>`` for the base batch (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from sklearn.feature_extraction.text import TfidfVectorizer

from proxmo import AdvantageConfig, compute_advantages, list_estimators
from proxmo.synthetic import make_batch

TFIDF = "tfidf_fit"


def _time_round_robin(tasks: dict[str, Callable[[], object]], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU milliseconds per task. CPU time is less disturbed by other
    processes on a shared host (it still counts every thread of this process)."""
    for fn in tasks.values():  # warm-up: imports, allocator, regex compilation
        fn()
    wall: dict[str, list[float]] = {name: [] for name in tasks}
    cpu: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeat):
        for name, fn in tasks.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def bench_batch(n_groups: int, group_size: int, max_steps: int, seed: int, repeat: int,
                estimators: list[str], distinct: bool = False) -> dict[str, object]:
    batch = make_batch(n_groups=n_groups, group_size=group_size, max_steps=max_steps, seed=seed, distinct=distinct)
    inputs = batch.to_inputs()
    tasks: dict[str, Callable[[], object]] = {
        TFIDF: lambda: TfidfVectorizer(max_features=1024).fit(batch.anchor)}
    for name in estimators:
        cfg = AdvantageConfig(estimator=name)
        tasks[name] = lambda cfg=cfg: compute_advantages(inputs, cfg)
    times, cpu = _time_round_robin(tasks, repeat)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"groups": n_groups, "group_size": group_size, "max_steps": max_steps, "rows": len(batch),
            "distinct_anchors": len(set(batch.anchor)), "repeat": repeat,
            "median_ms": med, "min_ms": {name: min(ts) for name, ts in times.items()},
            "cpu_median_ms": {name: statistics.median(ts) for name, ts in cpu.items()}}


def _print_batch(label: str, res: dict[str, object], estimators: list[str]) -> None:
    med, mins, cpu = res["median_ms"], res["min_ms"], res["cpu_median_ms"]
    print(f"\n[{label}] {res['groups']} groups x {res['group_size']} episodes x <= {res['max_steps']} steps: "
          f"{res['rows']} rows, {res['distinct_anchors']} distinct observations, {res['repeat']} runs each")
    print(f"{'what':<26}{'median ms':>11}{'min ms':>9}{'x GRPO':>9}{'x tfidf fit':>13}{'cpu ms':>9}{'cpu x fit':>11}")
    for name in [TFIDF, *estimators]:
        print(f"{name:<26}{med[name]:>11.2f}{mins[name]:>9.2f}{med[name] / med['grpo']:>9.2f}"
              f"{med[name] / med[TFIDF]:>13.2f}{cpu[name]:>9.2f}{cpu[name] / cpu[TFIDF]:>11.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="proxmo bench advantages", description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--scale", type=int, default=8, help="the large batch has this many times the groups (0: skip)")
    p.add_argument("--repeat", type=int, default=9, help="timed runs per estimator and batch (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimators", default=",".join(list_estimators()), help="comma-separated names")
    p.add_argument("--distinct", action="store_true",
                   help="also time the base batch with every observation made distinct (worst case)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = p.parse_args(argv)
    estimators = [e for e in args.estimators.split(",") if e]
    unknown = sorted(set(estimators) - set(list_estimators()))
    if unknown or "grpo" not in estimators or "proxmo" not in estimators:
        p.error(f"estimators must include grpo and proxmo and be among {list_estimators()}; bad: {unknown}")
    base = bench_batch(args.groups, args.group_size, args.max_steps, args.seed, args.repeat, estimators)
    _print_batch("base", base, estimators)
    result: dict[str, object] = {"base": base, "host": {"python": platform.python_version(),
                                                         "cpus": os.cpu_count(), "machine": platform.machine()}}
    if args.scale > 1:
        large = bench_batch(args.groups * args.scale, args.group_size, args.max_steps, args.seed,
                            max(3, args.repeat // 3), estimators)
        _print_batch(f"{args.scale}x", large, estimators)
        row_ratio = large["rows"] / base["rows"]
        growth = {name: large["median_ms"][name] / base["median_ms"][name] for name in [TFIDF, *estimators]}
        print(f"\ngrowth {args.scale}x batch ({row_ratio:.2f}x rows): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in growth.items()))
        result.update(large=large, growth=growth, row_ratio=row_ratio)
    if args.distinct:
        worst = bench_batch(args.groups, args.group_size, args.max_steps, args.seed, max(3, args.repeat // 3),
                            estimators, distinct=True)
        _print_batch("base, every observation distinct (no repeats to exploit)", worst, estimators)
        result["distinct"] = worst
    ratio = base["median_ms"]["proxmo"] / base["median_ms"][TFIDF]
    result["proxmo_vs_tfidf_fit"] = ratio
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    print(f"proxmo_vs_tfidf_fit={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
