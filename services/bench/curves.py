"""`proxmo bench curves`: learning curves of proxmo, gigpo, grpo and the two ablations.

Per environment family: one warm-started model (the same weights for every run),
one shared policy app, one embedded Redis; then for every seed, every estimator
runs the real training loop with the same budget (iterations x groups x G
episodes), the same training tasks (drawn from the seed) and the same held-out
evaluation tasks (``eval_split``, drawn from the seed). Runs are interleaved
(seed-major, estimators inner) so drift in machine load hits every estimator
alike. Only ``algorithm.estimator`` differs between the runs of one seed.

Reported per estimator: held-out success at every evaluation point, mean +-
standard error over seeds; the change from the warm start (paired per run);
on-policy rollout success; environment steps actually used. PNG plots and a
Markdown table go to ``--out``; per-run results are saved as they finish, so
``--resume`` continues an interrupted sweep. Last line:
``proxmo_minus_grpo=<difference of mean final held-out success>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.config import load_config

QUICKSTART = "deploy/configs/quickstart.yaml"
ESTIMATORS = ("proxmo", "gigpo", "grpo", "proxmo_modulation_only", "proxmo_soft_only")


@dataclass(frozen=True)
class Family:
    """A third-party game family and the warm-started model its runs share."""

    config: str
    overrides: tuple[str, ...]
    model: str


FAMILIES = {
    # TextWorldExpress "twc": one room, two items to put away (the CPU quick start).
    "twc": Family(QUICKSTART, (), "artifacts/tiny-model"),
    # TextWorldExpress "coin" (coin collector), four rooms, no doors: gold path ~6 steps,
    # ~4 admissible actions, a uniform-random policy wins ~27% within 10 steps.
    "coin": Family(QUICKSTART, ("env.game=coin", "env.game_params=numLocations=4,numDistractorItems=0,includeDoors=0"),
                   "artifacts/tiny-model-coin"),
}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than two values)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan"))


def run_record(rows: list[dict[str, float]], group_size: int) -> dict[str, Any]:
    """What one run contributes: held-out evaluation points, rollout success, env steps used."""
    evals = [(int(r["step"]), float(r["eval/success_rate"]), int(r.get("eval/episodes", 0)))
             for r in rows if "eval/success_rate" in r]
    train = [r for r in rows if "policy_version" in r]
    steps = [r.get("rollout/episode_length", 0.0) * r.get("rollout/groups", 0.0) * group_size for r in train]
    return {"eval_steps": [e[0] for e in evals], "eval_success": [e[1] for e in evals],
            "eval_episodes": [e[2] for e in evals],
            "rollout_success": [float(r.get("rollout/success_rate", float("nan"))) for r in train],
            "env_steps": float(sum(steps)), "iteration_s": [float(r.get("time/iteration_s", 0.0)) for r in train]}


def aggregate(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per estimator: mean +- se over seeds of every evaluation point, the final one and the gain."""
    out: dict[str, dict[str, Any]] = {}
    for est, recs in records.items():
        if not recs:
            continue
        points = sorted({s for r in recs for s in r["eval_steps"]})
        curve = []
        for p in points:
            vals = [r["eval_success"][r["eval_steps"].index(p)] for r in recs if p in r["eval_steps"]]
            m, se = mean_se(vals)
            curve.append({"step": p, "mean": m, "se": se, "n": len(vals)})
        final = [r["eval_success"][-1] for r in recs if r["eval_success"]]
        gain = [r["eval_success"][-1] - r["eval_success"][0] for r in recs if len(r["eval_success"]) > 1]
        half = [statistics.fmean(r["rollout_success"][len(r["rollout_success"]) // 2:])
                for r in recs if r["rollout_success"]]
        out[est] = {"curve": curve, "final": mean_se(final), "gain": mean_se(gain), "initial": mean_se(
            [r["eval_success"][0] for r in recs if r["eval_success"]]), "rollout_late": mean_se(half),
            "env_steps": mean_se([r["env_steps"] for r in recs]), "seeds": len(recs)}
    return out


def _pm(pair: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    m, se = pair
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f}" + ("" if math.isnan(se) else f" ± {se * scale:.{digits}f}")


def markdown_table(family: str, agg: dict[str, dict[str, Any]]) -> str:
    lines = [f"| {family}: estimator | seeds | held-out success at start (%) | final (%) | change (points) "
             "| rollout success, 2nd half (%) | env steps used |",
             "|---|---|---|---|---|---|---|"]
    for est, a in agg.items():
        lines.append(f"| {est} | {a['seeds']} | {_pm(a['initial'])} | {_pm(a['final'])} | {_pm(a['gain'])} "
                     f"| {_pm(a['rollout_late'])} | {_pm(a['env_steps'], 1.0, 0)} |")
    return "\n".join(lines)


def plot(family: str, agg: dict[str, dict[str, Any]], records: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Held-out success (mean +- se bands) and on-policy rollout success against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for est, a in agg.items():
        xs = [c["step"] for c in a["curve"]]
        ms = [c["mean"] for c in a["curve"]]
        ses = [0.0 if math.isnan(c["se"]) else c["se"] for c in a["curve"]]
        line = ax1.plot(xs, ms, marker="o", label=est)[0]
        ax1.fill_between(xs, [m - s for m, s in zip(ms, ses)], [m + s for m, s in zip(ms, ses)],
                         color=line.get_color(), alpha=0.15)
        runs = [r["rollout_success"] for r in records[est] if r["rollout_success"]]
        n = min(len(r) for r in runs)
        ax2.plot(range(1, n + 1), [statistics.fmean(r[i] for r in runs) for i in range(n)], marker=".", label=est)
    ax1.set(title=f"{family}: held-out success (mean ± s.e. over seeds)", xlabel="iteration", ylabel="success rate")
    ax2.set(title=f"{family}: on-policy rollout success (mean over seeds)", xlabel="iteration", ylabel="success rate")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_family(name: str, fam: Family, args, extra: list[str]) -> dict[str, Any]:
    from services.bench.e2e import BenchStack

    out = Path(args.out) / name
    cfg = load_config(fam.config, [*fam.overrides, f"model.path={fam.model}", f"iterations={args.iterations}",
                                   f"eval_every={args.eval_every}", f"eval_episodes={args.eval_episodes}",
                                   f"checkpoint_every={args.iterations}", "ray.dashboard=false", *extra])
    records: dict[str, list[dict[str, Any]]] = {e: [] for e in args.estimators}
    todo = []
    for seed in args.seeds:
        for est in args.estimators:
            path = out / "results" / f"{est}-s{seed}.json"
            if args.resume and path.is_file():
                records[est].append(json.loads(path.read_text()))
            else:
                todo.append((seed, est, path))
    if todo:
        stack = BenchStack(cfg, out)
        try:
            t0 = time.perf_counter()
            stack.start()
            print(f"[{name}] policy app up in {time.perf_counter() - t0:.0f} s; {len(todo)} runs", flush=True)
            for seed, est, path in todo:
                t0 = time.perf_counter()
                run_cfg = replace(cfg, seed=seed, learner=replace(cfg.learner, seed=seed),
                                  algorithm=replace(cfg.algorithm, estimator=est))
                _, rows = stack.run(run_cfg, f"curves-{name}-{est}-s{seed}")
                rec = {"estimator": est, "seed": seed, **run_record(rows, cfg.rollout.group_size),
                       "wall_s": time.perf_counter() - t0}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rec, indent=1))
                records[est].append(rec)
                print(f"[{name}] {est} seed {seed}: held-out {rec['eval_success']} at {rec['eval_steps']}, "
                      f"env steps {rec['env_steps']:.0f}, {rec['wall_s']:.0f} s", flush=True)
        finally:
            stack.close()
    agg = aggregate(records)
    png = plot(name, agg, records, out / f"curves_{name}.png")
    table = markdown_table(name, agg)
    (out / "table.md").write_text(table + "\n")
    print(table, flush=True)
    return {"family": name, "env": {"game": cfg.env.game, "game_params": cfg.env.game_params},
            "model": fam.model, "budget_episodes": args.iterations * cfg.learner.groups_per_batch * cfg.rollout.group_size,
            "eval_split": cfg.eval_split, "eval_episodes": args.eval_episodes, "plot": str(png), "table": table,
            "aggregate": agg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench curves", description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="twc,coin", help=f"comma list of {sorted(FAMILIES)}")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--eval-episodes", type=int, default=96)
    ap.add_argument("--out", default="bench-results/curves")
    ap.add_argument("--model", default="", help="warm-started model folder for every family given (default: per family)")
    ap.add_argument("--resume", action="store_true", help="keep finished runs' results, run only the rest")
    ap.add_argument("--json", dest="json_path", default="")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. learner.lr=5e-5")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.estimators = [e for e in args.estimators.split(",") if e]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    fams = {f: replace(FAMILIES[f], model=args.model) if args.model else FAMILIES[f] for f in families}
    results = [run_family(f, fams[f], args, list(args.overrides)) for f in families]
    out = {"families": results, "seeds": args.seeds, "iterations": args.iterations, "overrides": args.overrides}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    for r in results:
        agg = r["aggregate"]
        if "proxmo" in agg and "grpo" in agg:
            print(f"{r['family']}_proxmo_minus_grpo={agg['proxmo']['final'][0] - agg['grpo']['final'][0]:.4f}")
    first = results[0]["aggregate"]
    if "proxmo" in first and "grpo" in first:
        print(f"proxmo_minus_grpo={first['proxmo']['final'][0] - first['grpo']['final'][0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
