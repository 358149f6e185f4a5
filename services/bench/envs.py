"""`proxmo bench envs`: environment step throughput, each against a baseline in the same run.

Scenarios (every number is env steps per second of wall time, replaying the
expert's actions of the same sampled tasks; resets are not timed):

- **twx_guarded_vs_raw**: TextWorldExpress ``twc`` (the CPU quick start game)
  through :class:`GuardedEnv` (``isolate=False``: watchdog mode, and the default
  ``isolate=True``: a helper thread per call) vs the bare adapter, each JVM
  warmed up by an untimed second of play. A twc step takes well under a
  millisecond, so each measurement replays the tasks until ``--seconds`` of
  stepping have passed; the three variants take turns, in a rotating order,
  ``--repeat`` times, and the ratio reported is the median of the per-round
  ratios. Ratio ~1 means the guard is free.
- **scienceworld_cached_vs_uncached**: ScienceWorld with the valid-action list,
  replaying the same episode a second time (every prefix is in the cache, as
  for group members 2..G) vs the first pass (nothing cached); and
  ``scienceworld_no_valid_vs_uncached``: the list switched off.
- **alfworld_steps_per_s** (generated games) and **webshop_steps_per_s**
  (project catalogue): absolute rates, reported for BENCHMARKS.md.

Baseline and variant alternate within one process, ``--repeat`` times, and the
median is reported, so background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from services.config import EnvConfig


def _replay(env, tasks, plans) -> tuple[int, float]:
    steps, seconds = 0, 0.0
    for task, plan in zip(tasks, plans):
        env.reset(task)
        t = time.perf_counter()
        for a in plan:
            r = env.step(a)
            steps += 1
            if r.done:
                break
        seconds += time.perf_counter() - t
    return steps, seconds


def _plans(env, tasks) -> list[list[str]]:
    out = []
    for t in tasks:
        env.reset(t)
        out.append([a.lower() for a in env.expert_actions()])
    return out


def _replay_for(env, tasks, plans, seconds: float) -> float:
    """Steps per second of stepping, replaying ``tasks`` again and again until ``seconds`` have passed."""
    steps, spent = 0, 0.0
    while spent < seconds:
        n, s = _replay(env, tasks, plans)
        steps, spent = steps + n, spent + s
    return steps / spent


def bench_twx(episodes: int, repeat: int, seconds: float) -> dict:
    from services.envs import GuardedEnv, make_env

    cfg = EnvConfig(max_steps=50)
    envs = {"raw": make_env(cfg),
            "watchdog": GuardedEnv(lambda: make_env(cfg), cfg.step_timeout_s, isolate=False),
            "isolated": GuardedEnv(lambda: make_env(cfg), cfg.step_timeout_s, isolate=True)}
    rates: dict[str, list[float]] = {k: [] for k in envs}
    try:
        tasks = envs["raw"].sample_tasks("train", episodes, 0)
        plans = _plans(envs["raw"], tasks)
        for env in envs.values():  # each env has its own JVM: warm its JIT before timing
            _replay_for(env, tasks, plans, max(1.0, seconds))
        names = list(envs)
        for r in range(repeat):  # rotate the order, so no variant always runs first after a pause
            for k in names[r % len(names):] + names[:r % len(names)]:
                rates[k].append(_replay_for(envs[k], tasks, plans, seconds))
    finally:
        for env in envs.values():
            env.close()
    med = {k: statistics.median(v) for k, v in rates.items()}

    def ratio(k: str) -> float:  # paired: each round's variant against the same round's bare adapter
        return round(statistics.median(a / b for a, b in zip(rates[k], rates["raw"])), 3)

    return {"scenario": "twx_guarded_vs_raw", **{f"{k}_steps_per_s": round(v, 1) for k, v in med.items()},
            "watchdog_ratio": ratio("watchdog"), "ratio": ratio("isolated")}


def bench_scienceworld(repeat: int) -> dict:
    from services.envs import make_env

    results = {"uncached": [], "cached": [], "no_valid": []}
    for _ in range(repeat):
        env = make_env(EnvConfig(name="scienceworld", game="find-living-thing", max_steps=100))
        nv = make_env(EnvConfig(name="scienceworld", game="find-living-thing", max_steps=100,
                                options={"valid_actions": False}))
        try:
            tasks = env.sample_tasks("train", 1, 0)
            env.reset(tasks[0])
            plans = [[a.lower() for a in env.expert_actions()]]
            env._cache.clear()
            for key, e in (("uncached", env), ("cached", env), ("no_valid", nv)):
                n, s = _replay(e, tasks, plans)
                results[key].append(n / s)
        finally:
            env.close()
            nv.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"scenario": "scienceworld_cached_vs_uncached", **{f"{k}_steps_per_s": round(v, 2) for k, v in med.items()},
            "ratio": round(med["cached"] / med["uncached"], 2),
            "no_valid_vs_uncached": round(med["no_valid"] / med["uncached"], 2)}


def bench_absolute(name: str, cfg: EnvConfig, episodes: int) -> dict:
    from services.envs import make_env

    env = make_env(cfg)
    try:
        tasks = env.sample_tasks("train", episodes, 0)
        plans = _plans(env, tasks)
        n, s = _replay(env, tasks, plans)
    finally:
        env.close()
    return {"scenario": f"{name}_steps_per_s", "steps": n, "steps_per_s": round(n / s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench envs", description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=20, help="TextWorldExpress / WebShop episodes")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="stepping time of one TextWorldExpress measurement")
    ap.add_argument("--skip", default="", help="comma list of: twx, scienceworld, alfworld, webshop")
    ap.add_argument("--quick", action="store_true", help="smoke run: few episodes, five 0.3 s rounds, no ScienceWorld")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    skip = {s for s in args.skip.split(",") if s}
    episodes, repeat, seconds = (4, 5, 0.3) if args.quick else (args.episodes, args.repeat, args.seconds)
    if args.quick:
        skip.add("scienceworld")
    rows = []
    if "twx" not in skip:
        rows.append(bench_twx(episodes, repeat, seconds))
    if "scienceworld" not in skip:
        rows.append(bench_scienceworld(repeat))
    if "alfworld" not in skip:
        rows.append(bench_absolute("alfworld", EnvConfig(name="alfworld", game="pick", max_steps=50,
                                                        options={"source": "generated"}), 2 if args.quick else 4))
    if "webshop" not in skip:
        rows.append(bench_absolute("webshop", EnvConfig(name="webshop", max_steps=15), episodes * 5))
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
