"""`proxmo bench all` (= `make bench`): every benchmark of the project, one after the other.

Each benchmark runs as its own subprocess (``python -m services.cli bench NAME
--json FILE ...``) so one that crashes or hangs cannot take the others down,
and none inherits another's Ray cluster or threads. Every benchmark measures
its own baseline in the same run; the suite only collects: the ``key=value``
lines a benchmark prints (its last line is its headline ratio), plus the
metrics of its JSON file where the printed lines do not carry them (``envs``).

Results go to ``<out>/latest.json`` (machine, commands, exit codes, wall times,
every ratio, the raw JSON of each benchmark) and ``<out>/latest.md`` (a
Markdown table for BENCHMARKS.md). Every ratio is printed; the last line is a
summary: ``bench all: <ok>/<n> ok, <met>/<with target> targets met; name=ratio ...``.
The exit code is 1 when a benchmark failed (a missed target is reported, not
an error: the numbers are what they are on this machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KV_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_./-]*)=(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|-?nan|-?inf)\s*$")


@dataclass(frozen=True)
class Bench:
    """One benchmark: its arguments (full and ``--quick``), headline key and target."""

    name: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    headline: str
    target: tuple[str, float] | None  # (">=" or "<=", value)
    what: str
    default: bool = True  # part of `bench all` without --only
    extra: tuple[str, ...] = field(default=())


BENCHES: tuple[Bench, ...] = (
    Bench("advantages", ("--distinct",), ("--repeat", "3", "--scale", "0"), "proxmo_vs_tfidf_fit", ("<=", 1.5),
          "ProxMO advantages vs a TF-IDF fit of the same observations (ALFWorld-shaped batch)"),
    Bench("buffer", (), ("--quick",), "buffer_vs_raw_xadd", None,
          "trajectory buffer push+read+ack vs raw XADD of the same bytes (groups/s)"),
    Bench("serving", (), ("--reps", "2", "--prompts", "16"), "serve_vs_direct", (">=", 0.85),
          "tokens/s through the Serve endpoint vs the same vLLM engine called directly"),
    Bench("weights", ("--engine",), ("--sizes", "1e6,2.5e7", "--reps", "1"), "publish_vs_copy", ("<=", 2.0),
          "weight publish learner -> replica vs in-memory copy, largest size (0.5B bf16)"),
    Bench("envs", (), ("--quick",), "twx_guarded_vs_raw", (">=", 0.9),
          "env steps/s through the fault guard vs the bare simulator (TextWorldExpress twc)"),
    Bench("e2e", (), ("--iterations", "2", "--eval-episodes", "4", "learner.groups_per_batch=2",
                      "rollout.envs_per_worker=16", "env.max_steps=4"), "async_vs_sync", (">=", 1.6),
          "quick-start iteration time, async (policy lag 1) vs sync"),
    Bench("scaling", (), ("--workers", "1,2", "--replicas", "1", "--groups", "2", "--envs-per-worker", "8"),
          "scaling_4w_vs_1w", None, "rollout env steps/s, 4 rollout workers vs 1 (1 replica)"),
    Bench("curves", (), ("--families", "twc", "--estimators", "proxmo,grpo", "--seeds", "0", "--iterations", "1",
                         "--eval-every", "0", "--eval-episodes", "4"), "proxmo_minus_grpo", None,
          "final held-out success, proxmo minus grpo (learning curves, long: opt-in)", default=False),
)
BY_NAME = {b.name: b for b in BENCHES}
QUICK_RENAMES = {"scaling": "scaling_2w_vs_1w"}  # --quick scaling has no 4-worker point


def parse_kv_lines(text: str) -> dict[str, float]:
    """Every ``key=number`` line of a benchmark's output, in order (later lines win)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _KV_LINE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def last_kv(text: str) -> tuple[str, float] | None:
    """The headline: the last ``key=number`` line."""
    found = None
    for line in text.splitlines():
        m = _KV_LINE.match(line)
        if m:
            found = (m.group(1), float(m.group(2)))
    return found


def metrics_from_json(name: str, data: Any) -> dict[str, float]:
    """Ratios a benchmark keeps in its JSON only (``envs`` prints one row per scenario)."""
    out: dict[str, float] = {}
    if name == "envs" and isinstance(data, list):
        for row in data:
            scen = str(row.get("scenario", ""))
            for key, value in row.items():
                if key in ("ratio", "steps_per_s"):  # the scenario's own number
                    out[scen] = float(value)
                elif key.endswith("ratio") or "_vs_" in key:  # secondary ratios of the same scenario
                    out[f"{scen}.{key}"] = float(value)
    return out


def meets(value: float, target: tuple[str, float] | None) -> bool | None:
    if target is None or value is None or math.isnan(value):
        return None
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def command(bench: Bench, json_path: Path, quick: bool, python: str = sys.executable) -> list[str]:
    args = bench.quick_args if quick else bench.args
    return [python, "-m", "services.cli", "bench", bench.name, "--json", str(json_path), *args]


def run_one(bench: Bench, out_dir: Path, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark, echo its output live, and collect its numbers."""
    json_path = out_dir / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = command(bench, json_path, quick)
    print(f"\n=== bench {bench.name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    killed = threading.Event()

    def kill() -> None:  # a silent hang never returns a line, so the clock must not depend on output
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    if killed.is_set():
        rc = -9
        lines.append(f"\n(bench all: killed after {timeout_s:.0f} s)\n")
    text = "".join(lines)
    data = json.loads(json_path.read_text()) if json_path.is_file() else None
    metrics = {**metrics_from_json(bench.name, data), **parse_kv_lines(text)}
    head = last_kv(text)
    headline = bench.headline if not quick else QUICK_RENAMES.get(bench.name, bench.headline)
    value = metrics.get(headline, head[1] if head and head[0] == headline else float("nan"))
    return {"name": bench.name, "command": "proxmo " + " ".join(cmd[3:]), "rc": rc, "ok": rc == 0 and not math.isnan(value),
            "seconds": round(time.perf_counter() - t0, 1), "headline": headline, "value": value,
            "target": list(bench.target) if bench.target else None,
            "meets_target": meets(value, bench.target if not quick else None) if rc == 0 else None,
            "what": bench.what, "metrics": metrics, "json": data, "tail": text[-2000:]}


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The table BENCHMARKS.md shows: one row per benchmark, the headline first, other ratios after."""
    lines = ["| benchmark | headline | value | target | met | other numbers | wall s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        tgt = f"{r['target'][0]} {r['target'][1]}" if r.get("target") else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.get("meets_target")]
        if r["rc"] != 0:
            met = f"failed (rc {r['rc']})"
        others = ", ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].items() if k != r["headline"])
        lines.append(f"| {r['name']} | `{r['headline']}` | {_fmt(r['value'])} | {tgt} | {met} | {others or '—'} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def summary_line(results: list[dict[str, Any]]) -> str:
    ok = sum(r["ok"] for r in results)
    judged = [r for r in results if r.get("meets_target") is not None]
    met = sum(bool(r["meets_target"]) for r in judged)
    heads = " ".join(f"{r['headline']}={_fmt(r['value'])}" for r in results)
    return f"bench all: {ok}/{len(results)} ok, {met}/{len(judged)} targets met; {heads}"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    return info


def select(only: str, skip: str, with_curves: bool) -> list[Bench]:
    names = [n for n in only.split(",") if n] if only else [b.name for b in BENCHES if b.default or with_curves]
    unknown = [n for n in names + [s for s in skip.split(",") if s] if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(BY_NAME)}")
    return [BY_NAME[n] for n in names if n not in set(skip.split(","))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench all", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(BY_NAME)}")
    ap.add_argument("--skip", default="")
    ap.add_argument("--with-curves", action="store_true", help="also run the learning curves (tens of minutes)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark (targets not judged)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark before it is killed")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    try:
        benches = select(args.only, args.skip, args.with_curves)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    host = machine()
    results = [run_one(b, out, args.quick, args.timeout) for b in benches]
    report = {"started": started, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "machine": host, "results": results}
    (out / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(results)
    (out / "latest.md").write_text(f"Machine: {host.get('cpus')} CPUs ({host.get('cpu_model', '')}), "
                                   f"{host.get('mem_total_gib', '?')} GiB, load {host.get('load_avg_1m', 0):.1f} at "
                                   f"start; {started}{' (quick)' if args.quick else ''}\n\n{table}\n")
    print(f"\n{table}\n")
    for r in results:
        for k, v in r["metrics"].items():
            print(f"{r['name']}.{k}={_fmt(v)}")
    print(f"results: {out / 'latest.json'} {out / 'latest.md'}")
    print(summary_line(results))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
