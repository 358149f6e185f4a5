"""Helpers shared by the fault tests: a training run on the shared endpoint, and the counts."""

from __future__ import annotations

import json
import threading

from services.driver import TrainingRun
from tests.fixtures.training import small_train_config


def train_cfg(tmp_path, redis_url: str, model_dir, **over):
    """The shared small run, with a longer Redis reconnect window for the Redis-restart test."""
    over.setdefault("eval_episodes", 2)
    return small_train_config(tmp_path, redis_url, model_dir, prefix="f",
                              extra=("buffer.reconnect_timeout_s=60",), **over)


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
