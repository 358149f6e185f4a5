"""The main job end to end on real parts: Ray actors, the shared vLLM Serve endpoint, a real
redis-server, TextWorldExpress games. Small sizes; the model is the untrained tiny model, so the
point is the plumbing and the counts, not learning (that is `make run` / BENCHMARKS.md).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from services.driver import TrainingRun
from tests.fixtures.training import small_train_config


def _cfg(tmp_path, redis_url, model_dir, **over):
    return small_train_config(tmp_path, redis_url, model_dir, **over)


def _run(cfg, policy_app, during=None):
    run = TrainingRun(cfg)
    try:
        run.start(deployment=policy_app.deployment)
        if during:
            threading.Thread(target=during, args=(run,), daemon=True).start()
        result = run.train()
        stats = run.learner and __import__("ray").get(run.learner.stats.remote())
        rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
        return run, result, stats, rows
    finally:
        run.close()


def _assert_counts(stats, expected_groups):
    # Every group produced once, consumed once, acked after its checkpoint: nothing lost, nothing twice.
    assert stats["produced"] == expected_groups, stats
    assert stats["acked"] + stats["dead"] + stats["dropped_stale"] == stats["produced"], stats
    assert stats["pending"] == 0 and stats["depth"] == 0, stats


@pytest.fixture
def loop_env(tmp_path, redis_url, policy_app):
    yield tmp_path, redis_url, policy_app
    policy_app.restore_initial()


def _scrape(url: str, needles: list[str], timeout_s: float = 60.0) -> str:
    """Prometheus text from the node's metrics agent once every needle shows (export is periodic)."""
    import urllib.request

    deadline = time.time() + timeout_s
    body = ""
    while time.time() < deadline:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if all(n in body for n in needles):
            return body
        time.sleep(2)
    return body


def test_sync_training_commits_checkpoints_and_counts(loop_env, ray_metrics_url):
    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir)
    run, result, stats, rows = _run(cfg, app)
    _assert_counts(stats, expected_groups=2 * 2)
    ckpt = run.out / "checkpoints" / "latest"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    meta = json.loads((ckpt / "trainer_meta.json").read_text())
    assert meta["iteration"] == 2 and meta["step"] == 2
    train_rows = [r for r in rows if "policy_version" in r]
    assert len(train_rows) == 2
    assert all(r["staleness/max"] <= 0 for r in train_rows)  # sync: rollouts use the newest weights
    # The session's tiny tokenizer is trained on little text, so a long game prompt may not fit the
    # context: such an episode is an infrastructure failure (masked), never a silent zero.
    evals = [r for r in rows if "eval/episodes" in r]
    assert all(r["eval/episodes"] + r["eval/infra_failures"] == 4 for r in evals), evals
    assert 0.0 <= result["success_after"] <= 1.0
    # Paired before/after evaluation: same tasks, same sampling seeds, per-episode outcomes kept.
    state = json.loads((run.out / "run_state.json").read_text())
    assert len(state["outcomes_before"]) == len(state["outcomes_after"]) == 4
    valid = sum(b is not None and a is not None for b, a in zip(state["outcomes_before"], state["outcomes_after"]))
    assert result["paired"]["pairs"] == valid
    # The dashboard's metrics: the custom gauges reach the node's Prometheus endpoint.
    needles = [f'ray_proxmo_{k}{{' for k in ("rollout_success_rate", "policy_version", "adv_mean",
                                            "buffer_depth", "time_weight_sync_s", "learner_idle_ratio")]
    body = _scrape(ray_metrics_url, needles)
    missing = [n for n in needles if n not in body]
    assert not missing, missing
    assert f'run="{cfg.run_name}"' in body


def test_async_mode_overlaps_within_the_lag_bound(loop_env):
    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir, mode="async", max_policy_lag=1, iterations=3)
    _, _, stats, rows = _run(cfg, app)
    _assert_counts(stats, expected_groups=3 * 2)
    train_rows = [r for r in rows if "policy_version" in r]
    assert len(train_rows) == 3
    assert max(r["staleness/max"] for r in train_rows) <= 1


def test_time_budget_stops_after_the_rollouts_in_flight(loop_env):
    # rl_seconds is spent after iteration 0; async lag 1 has already dispatched iteration 1's rollouts,
    # so the run learns from them too and stops at 2 of 5 iterations, every produced group acked.
    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir, mode="async", max_policy_lag=1, iterations=5, rl_seconds=1e-6)
    run, result, stats, rows = _run(cfg, app)
    assert result["iterations"] == 2
    _assert_counts(stats, expected_groups=2 * 2)
    assert json.loads((run.out / "checkpoints" / "latest" / "trainer_meta.json").read_text())["iteration"] == 2


def test_scale_workers_up_and_down_mid_run(loop_env):
    import ray

    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir, iterations=4)
    asks = iter([3, 1])

    def scaler(run):
        # Ask through the named control actor, as `proxmo scale` does from another process.
        control = ray.get_actor(f"proxmo-control-{cfg.run_name}")
        seen = 0
        while seen < 2:
            status = ray.get(control.get_status.remote())
            if status.get("iteration", 0) > seen:
                ray.get(control.request_workers.remote(next(asks)))
                seen += 1
            time.sleep(0.2)

    _, _, stats, rows = _run(cfg, app, during=scaler)
    _assert_counts(stats, expected_groups=4 * 2)
    sizes = [r["rollout/workers"] for r in rows if "rollout/workers" in r]
    assert 3.0 in sizes and sizes[-1] == 1.0, sizes


def test_killed_worker_is_replaced_and_its_group_rerun_once(loop_env):
    import ray

    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir, iterations=2, **{"env.max_steps": 6})
    killed = []

    def killer(run):
        # Kill the worker while its chunk is in flight (mid-episode).
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = list(run.pool._busy)
            if busy:
                time.sleep(0.5)
                ray.kill(run.pool.workers[busy[0]], no_restart=True)
                killed.append(busy[0])
            time.sleep(0.05)

    run, _, stats, rows = _run(cfg, app, during=killer)
    assert killed, "the test never caught a worker mid-chunk"
    assert run.pool.replaced >= 1
    _assert_counts(stats, expected_groups=2 * 2)


def test_resume_continues_from_the_checkpoint(loop_env):
    tmp_path, redis_url, app = loop_env
    cfg = _cfg(tmp_path, redis_url, app.model_dir, iterations=1)
    _, first, stats1, _ = _run(cfg, app)
    resumed = replace(cfg, iterations=2, resume=True)
    run, second, stats2, rows = _run(resumed, app)
    meta = json.loads((run.out / "checkpoints" / "latest" / "trainer_meta.json").read_text())
    assert meta["iteration"] == 2 and meta["step"] == 2  # one more step, not two
    assert second["success_before"] == first["success_before"]  # not re-measured
    _assert_counts(stats2, expected_groups=2 * 2)
