"""`proxmo bench scaling`: rollout throughput with 1, 2, 4 rollout workers and 1, 2 endpoint replicas.

The real rollout path (``WorkerPool`` of rollout actors, TextWorldExpress games,
the Serve app with the vLLM CPU engine), without the learner: the same
``--groups`` tasks (G episodes each) are played for every (replicas, workers)
point and nothing is pushed. Each point first gets a warm-up run (actor start,
tokenizer load, one JVM per env slot), then ``--repeat`` timed runs (median). Points run one after the other, one
pool at a time (every env slot is its own JVM), so background load on a shared
machine shows up as noise between points: compare repeated invocations. Throughput is env steps per second of wall time (episodes/s is
printed too; episode lengths differ a little from run to run as sampling does).

Last line: ``scaling_4w_vs_1w=<ratio>`` at one replica. Where the limit is on a
small machine: every worker, every env JVM and every engine replica share the
same cores, so once the engine batches are large enough to keep the cores busy
more workers only add contention (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from services.config import load_config

QUICKSTART = "deploy/configs/quickstart.yaml"


def measure_point(pool, assignments, repeat: int) -> dict[str, float]:
    """Median env steps/s and episodes/s of ``repeat`` timed runs of the same assignments."""
    sps, eps, secs = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        summaries = pool.run(assignments, push=False)
        dt = time.perf_counter() - t0
        sps.append(sum(s.steps for s in summaries) / dt)
        eps.append(sum(s.episodes for s in summaries) / dt)
        secs.append(dt)
    return {"env_steps_per_s": statistics.median(sps), "episodes_per_s": statistics.median(eps),
            "seconds": statistics.median(secs), "runs_env_steps_per_s": sps}


def ratios(points: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput ratios vs one worker on the same replica count, and 2 vs 1 replicas at equal workers."""
    by = {(p["replicas"], p["workers"]): p["env_steps_per_s"] for p in points}
    out: dict[str, float] = {}
    for (r, w), v in sorted(by.items()):
        if w != 1 and (r, 1) in by:
            out[f"scaling_{w}w_vs_1w" + ("" if r == 1 else f"_{r}r")] = v / by[(r, 1)]
        if r != 1 and (1, w) in by:
            out[f"scaling_{r}r_vs_1r_{w}w"] = v / by[(1, w)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=QUICKSTART)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--groups", type=int, default=8, help="tasks per timed run (x rollout.group_size episodes)")
    ap.add_argument("--envs-per-worker", type=int, default=16, help="concurrent episodes per worker")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default="bench-results/scaling")
    ap.add_argument("--json", dest="json_path", default="")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workers = [int(w) for w in args.workers.split(",") if w]
    replicas = [int(r) for r in args.replicas.split(",") if r]
    cfg = load_config(args.config, [*args.overrides, f"rollout.envs_per_worker={args.envs_per_worker}",
                                    f"serving.max_replicas={max(replicas)}", f"rollout.max_workers={max(workers)}",
                                    "ray.dashboard=false"])
    import ray

    from services.bench.e2e import BenchStack
    from services.driver import _RolloutActor
    from services.envs import make_env
    from services.rollout import Assignment
    from services.workers import WorkerPool

    stack = BenchStack(cfg, Path(args.out))
    points: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        stack.start()
        client = copy.copy(stack.deployment.client)
        client.scaler = None
        c = cfg

        def make_worker(wid: str):
            return ray.remote(_RolloutActor).options(num_cpus=c.rollout.num_cpus, max_restarts=0).remote(
                wid, c.env, c.rollout, c.sampling, stack.model_path, client, c.buffer, "", c.model.max_model_len)

        env = make_env(c.env)
        tasks = env.sample_tasks("train", args.groups, seed=c.seed)
        env.close()
        assignments = [Assignment(t, group_id=f"scaling/g{j}") for j, t in enumerate(tasks)]
        per_chunk = max(args.envs_per_worker // c.rollout.group_size, 1)
        for r in replicas:
            t0 = time.perf_counter()
            stack.deployment.set_replicas(r, r)
            print(f"{r} replica(s) ready in {time.perf_counter() - t0:.0f} s", flush=True)
            for w in workers:  # one pool at a time: each env slot is a JVM (~80 MB)
                pool = WorkerPool(make_worker, w, groups_per_chunk=per_chunk, min_size=1, max_size=w)
                try:
                    pool.run(assignments[: w * per_chunk], push=False)  # warm-up: every env slot of every worker
                    p = measure_point(pool, assignments, args.repeat)
                finally:
                    pool.shutdown()
                p.update(replicas=r, workers=w)
                points.append(p)
                print(f"replicas={r} workers={w}: {p['env_steps_per_s']:.1f} env steps/s, "
                      f"{p['episodes_per_s']:.2f} episodes/s ({p['seconds']:.1f} s per run)", flush=True)
    finally:
        stack.close()
    rs = ratios(points)
    for k, v in rs.items():
        if k != "scaling_4w_vs_1w":
            print(f"{k}={v:.3f}")
    out = {"config": args.config, "groups": args.groups, "group_size": cfg.rollout.group_size,
           "envs_per_worker": args.envs_per_worker, "repeat": args.repeat, "points": points, **rs,
           "cpus": os.cpu_count(), "wall_s": time.perf_counter() - t_start}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    if "scaling_4w_vs_1w" in rs:
        print(f"scaling_4w_vs_1w={rs['scaling_4w_vs_1w']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
