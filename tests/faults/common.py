"""Helpers shared by the fault tests: a training run on the shared endpoint, and the counts."""

from __future__ import annotations

import json
import threading
import uuid

from services.config import load_config
from services.driver import TrainingRun


def train_cfg(tmp_path, redis_url: str, model_dir, **over):
    """A small sync run on the session's tiny model (plumbing and counts, not learning)."""
    name = f"f{uuid.uuid4().hex[:8]}"
    overrides = [
        f"run_name={name}", f"output_dir={tmp_path}", "iterations=2", "eval_episodes=2", "checkpoint_every=1",
        f"buffer.url={redis_url}", f"buffer.stream=faults:{name}", "buffer.max_depth=16",
        "buffer.reconnect_timeout_s=60",
        f"model.path={model_dir}", "model.tiny=false",
        "env.max_steps=3", "rollout.group_size=2", "rollout.envs_per_worker=4", "rollout.num_workers=1",
        "rollout.min_workers=1", "rollout.max_workers=3", "rollout.num_cpus=0.25",
        "learner.groups_per_batch=2", "learner.micro_batch_size=16", "learner.num_cpus=0.5", "learner.lr=1e-4",
        "sampling.max_tokens=12", "ray.dashboard=false",
    ] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, overrides)


def run_training(cfg, policy_app, during=None, setup=None):
    """Start, train (with ``during(run)`` in a thread), and return run, stats, metric rows, thread errors."""
    import ray

    run = TrainingRun(cfg)
    errors: list[BaseException] = []

    def guarded(fn):
        def body(r):
            try:
                fn(r)
            except BaseException as exc:  # surfaced by the caller's assertion
                errors.append(exc)
        return body

    try:
        run.start(deployment=policy_app.deployment)
        if setup:
            setup(run)
        th = None
        if during:
            th = threading.Thread(target=guarded(during), args=(run,), daemon=True)
            th.start()
        run.train()
        if th is not None:
            th.join(timeout=120)
        stats = ray.get(run.learner.stats.remote())
        rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
        return run, stats, rows, errors
    finally:
        run.close()


def report_counts(label: str, stats: dict) -> dict:
    """Print the counts line every fault test ends with, and return it."""
    settled = stats["acked"] + stats["dead"] + stats["dropped_stale"]
    counts = {
        "produced": stats["produced"], "consumed": stats["consumed"], "redelivered": stats["redelivered"],
        "acked": stats["acked"], "dead_lettered": stats["dead"], "dropped_stale": stats["dropped_stale"],
        "duplicates_rejected": stats["duplicates"],
        "lost": stats["produced"] - settled - stats["depth"] - stats["pending"],
        "unsettled": stats["depth"] + stats["pending"],
    }
    print(f"\n[faults] {label}: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return counts


def assert_exactly_once(stats: dict, expected_groups: int) -> None:
    """Every group produced once, consumed once, settled once; nothing lost, nothing left over."""
    assert stats["produced"] == expected_groups, stats
    assert stats["consumed"] == expected_groups, stats  # first deliveries: no group twice
    assert stats["acked"] + stats["dead"] + stats["dropped_stale"] == stats["produced"], stats
    assert stats["pending"] == 0 and stats["depth"] == 0, stats
