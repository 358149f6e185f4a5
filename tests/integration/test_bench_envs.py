"""`proxmo bench envs`' TextWorldExpress scenario against the real simulator, on a tiny budget."""

from __future__ import annotations

import time

from services.bench import envs as bench
from services.config import EnvConfig
from services.envs import make_env


def test_replay_for_steps_until_its_time_has_passed():
    env = make_env(EnvConfig(max_steps=50))
    try:
        tasks = env.sample_tasks("train", 2, 0)
        plans = bench._plans(env, tasks)
        t = time.perf_counter()
        rate = bench._replay_for(env, tasks, plans, 0.2)
        assert time.perf_counter() - t >= 0.2  # the resets between replays are not counted, the steps are
        assert rate > 0
    finally:
        env.close()


def test_twx_scenario_reports_each_variant_and_paired_ratios():
    row = bench.bench_twx(episodes=2, repeat=3, seconds=0.05)
    assert row["scenario"] == "twx_guarded_vs_raw"
    for k in ("raw", "watchdog", "isolated"):
        assert row[f"{k}_steps_per_s"] > 0
    # the ratios are medians of per-round ratios, not ratios of medians: positive and finite, near 1 for a cheap guard
    assert 0.05 < row["ratio"] < 20 and 0.05 < row["watchdog_ratio"] < 20
