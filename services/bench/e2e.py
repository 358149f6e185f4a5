"""`proxmo bench e2e`: end-to-end iteration time on the quick-start config, sync vs async.

Both modes run in the same process against the same Ray cluster, the same
embedded redis-server and ONE policy Serve app (one vLLM engine), one after the
other with the same config, seeds and tasks; only ``mode`` differs (async at
``max_policy_lag`` 1). Every run is the real :class:`~services.driver.TrainingRun`
loop; its per-iteration metrics (``metrics.jsonl``) give the numbers:

- iteration time = ``time/iteration_s`` (rollout wait + learn + publish + checkpoint
  as the driver sees it); the first ``--warmup`` iterations of each run are left
  out (actor start-up, pipeline fill), the rest are "steady".
- breakdown (sync run): rollout = ``time/rollout_wait_s`` (the whole rollout, since
  nothing overlaps), advantage, update, weight sync, checkpoint, learner read wait.
- success per iteration (on-policy rollouts) and held-out eval before/after, so a
  faster async loop can be checked for lost sample efficiency.

Last line: ``async_vs_sync=<ratio>`` = steady sync iteration time / steady async
iteration time (target >= 1.6). On a machine with fewer cores than the pipeline
has busy stages, overlap has nothing to run on and the ratio tends to 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.config import TrainConfig, load_config

log = logging.getLogger(__name__)

QUICKSTART = "deploy/configs/quickstart.yaml"
BREAKDOWN = ("time/rollout_wait_s", "time/learner_wait_s", "time/advantage_s", "time/update_s",
             "time/weight_sync_s", "time/checkpoint_s", "time/learner_step_s", "time/iteration_s")


class BenchStack:
    """Ray + one embedded Redis + one policy app, shared by every training run of a benchmark.

    Sharing the vLLM engine is what makes several runs fit on a small machine: each
    run's learner publishes its own (warm-start) weights as a new version before its
    first rollout, so runs start from identical weights without restarting the engine.
    """

    def __init__(self, cfg: TrainConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.redis = None
        self.redis_url = ""
        self.deployment = None
        self.model_path = ""

    def start(self) -> None:

        from services.buffer import EmbeddedRedis
        from services.serving.app import deploy_policy
        from services.sft import ensure_warm_model

        c = self.cfg
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(c.serving.kv_cache_gib))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = ensure_warm_model(c.model, c.env, c.sft, c.seed)
        self.redis_url = c.buffer.url or os.environ.get("REDIS_URL", "")
        if not self.redis_url:
            self.redis = EmbeddedRedis(data_dir=str(self.out_dir / "redis"))
            self.redis_url = self.redis.start()
        _init_ray(c.ray.num_cpus or max(8, os.cpu_count() or 1), c.ray.namespace)
        model_cfg = replace(c.model, path=self.model_path)
        self.deployment = deploy_policy(model_cfg, c.serving, port=0)

    def run(self, cfg: TrainConfig, name: str) -> tuple[dict[str, float], list[dict[str, float]]]:
        """One full training run on the shared parts; returns (train() result, metrics rows)."""
        from services.driver import TrainingRun

        cfg = replace(cfg, run_name=name, output_dir=str(self.out_dir / "runs"), resume=False,
                      model=replace(cfg.model, path=self.model_path),
                      buffer=replace(cfg.buffer, url=self.redis_url, stream=f"bench:{name}:{time.time_ns()}"))
        shutil.rmtree(Path(cfg.output_dir) / name, ignore_errors=True)  # metrics.jsonl appends
        run = TrainingRun(cfg)
        try:
            run.start(deployment=self.deployment)
            result = run.train()
        finally:
            run.close()
        rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return result, rows

    def close(self) -> None:
        import ray
        from ray import serve

        if self.deployment is not None:
            try:
                self.deployment.shutdown()
            except Exception as exc:  # report, keep shutting down
                log.warning("policy app shutdown: %s", exc)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if self.redis is not None:
            self.redis.stop()


def _init_ray(num_cpus: int, namespace: str, attempts: int = 3) -> None:
    """Start a local Ray; retry, because Ray gives its raylet a fixed 30 s to register and a
    heavily loaded host (a shared CI box) misses that now and then."""
    import ray

    for attempt in range(1, attempts + 1):
        if ray.is_initialized():
            return
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=namespace, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for the start-up timeout
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            log.warning("ray.init attempt %d failed (%s); retrying", attempt, exc)
            ray.shutdown()
            time.sleep(5)


def train_rows(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """The per-iteration rows (eval-only rows carry no policy version)."""
    return [r for r in rows if "policy_version" in r and "time/iteration_s" in r]


def breakdown(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per stage. The learner's ``time/checkpoint_s`` is clocked from before the
    publish (services/learner_worker.py), so the checkpoint alone is that minus the weight sync."""
    out = {k.removeprefix("time/"): statistics.fmean(r.get(k, 0.0) for r in rows) for k in BREAKDOWN}
    out["checkpoint_only_s"] = statistics.fmean(
        max(0.0, r.get("time/checkpoint_s", 0.0) - r.get("time/weight_sync_s", 0.0)) for r in rows)
    return out


def summarize_run(rows: list[dict[str, float]], warmup: int, group_size: int) -> dict[str, Any]:
    """Steady-state iteration time, env steps/s, mean breakdown, and the success curve of one run."""
    its = train_rows(rows)
    if len(its) <= warmup:
        raise ValueError(f"run has {len(its)} iterations; need more than --warmup={warmup}")
    steady = its[warmup:]
    wall = sum(r["time/iteration_s"] for r in steady)
    steps = sum(r["rollout/episode_length"] * r["rollout/groups"] * group_size for r in steady)
    return {
        "iterations": len(its), "steady_iterations": len(steady),
        "iteration_s": wall / len(steady),
        "iteration_s_median": statistics.median(r["time/iteration_s"] for r in steady),
        "iterations_per_s": len(steady) / wall, "env_steps_per_s": steps / wall,
        "breakdown_s": breakdown(steady),
        "success_curve": [round(r.get("rollout/success_rate", float("nan")), 4) for r in its],
        "staleness_max": max(r.get("staleness/max", 0.0) for r in its),
        "dropped_stale": sum(r.get("buffer/dropped_stale", 0.0) for r in its),
    }


def compare(summaries: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """async_vs_sync from the mean steady iteration time over the repeats of each mode."""
    sync = statistics.fmean(s["iteration_s"] for s in summaries["sync"])
    asy = statistics.fmean(s["iteration_s"] for s in summaries["async"])
    sync_sps = statistics.fmean(s["env_steps_per_s"] for s in summaries["sync"])
    async_sps = statistics.fmean(s["env_steps_per_s"] for s in summaries["async"])
    return {"async_vs_sync": sync / asy, "async_vs_sync_env_steps": async_sps / sync_sps}


def _print_summary(mode: str, s: dict[str, Any], result: dict[str, float]) -> None:
    b = s["breakdown_s"]
    print(f"[{mode}] {s['steady_iterations']} steady of {s['iterations']} iterations: "
          f"{s['iteration_s']:.2f} s/iteration (median {s['iteration_s_median']:.2f}), "
          f"{s['env_steps_per_s']:.1f} env steps/s; max staleness {s['staleness_max']:.0f}, "
          f"dropped stale {s['dropped_stale']:.0f}", flush=True)
    print("    breakdown (mean s): " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()), flush=True)
    print(f"    rollout success per iteration: {s['success_curve']}; held-out eval "
          f"{result['success_before']:.3f} -> {result['success_after']:.3f} ({result['eval_episodes']} episodes)",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=QUICKSTART)
    ap.add_argument("--iterations", type=int, default=6, help="iterations per run (the quick start is bounded by its rl_seconds)")
    ap.add_argument("--warmup", type=int, default=1, help="leading iterations left out of the timing")
    ap.add_argument("--repeats", type=int, default=1, help="sync/async pairs, alternating order")
    ap.add_argument("--eval-episodes", type=int, default=64, help="held-out episodes before/after each run")
    ap.add_argument("--out", default="bench-results/e2e", help="folder for runs, redis AOF and results")
    ap.add_argument("--json", dest="json_path", default="")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. learner.groups_per_batch=4")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_config(args.config, [*args.overrides, f"iterations={args.iterations}",
                                    f"eval_episodes={max(args.eval_episodes, 1)}", "eval_every=0",
                                    "ray.dashboard=false"])
    stack = BenchStack(cfg, Path(args.out))
    summaries: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    results: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    t0 = time.perf_counter()
    try:
        stack.start()
        print(f"policy app up in {time.perf_counter() - t0:.0f} s (model {stack.model_path})", flush=True)
        for rep in range(args.repeats):
            for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
                run_cfg = replace(cfg, mode=mode, max_policy_lag=1)
                result, rows = stack.run(run_cfg, f"e2e-{mode}-{rep}")
                s = summarize_run(rows, args.warmup, cfg.rollout.group_size)
                _print_summary(mode, s, result)
                summaries[mode].append(s)
                results[mode].append(result)
    finally:
        stack.close()
    ratios = compare(summaries)
    out = {"config": args.config, "overrides": args.overrides, "iterations": args.iterations,
           "warmup": args.warmup, "repeats": args.repeats, "runs": summaries, "eval": results, **ratios,
           "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
           "wall_s": time.perf_counter() - t0}
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    print(f"async env steps/s vs sync: {ratios['async_vs_sync_env_steps']:.3f}")
    print(f"async_vs_sync={ratios['async_vs_sync']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
