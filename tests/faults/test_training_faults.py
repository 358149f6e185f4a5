"""Faults during a real training run: rollout workers, the learner and Redis die mid-run.

Real parts throughout: Ray actors, the session's vLLM Serve endpoint, a redis-server
owned by this module (it is paused and restarted here), TextWorldExpress games.
Each test ends by printing and checking the buffer's counts (``[faults] ...`` lines).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.faults.common import assert_exactly_once, report_counts, run_training, train_cfg

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]  # bounded; includes the session engine start


def _wait(pred, timeout_s: float, what: str, step: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _stats_client(cfg, url):
    from services.buffer import TrajectoryBuffer

    return TrajectoryBuffer(cfg.buffer, url, consumer="fault-observer")


def _clients(server) -> dict[str, dict[str, str]]:
    """CLIENT LIST as {id: fields}."""
    import redis

    r = redis.Redis.from_url(server.url)
    try:
        lines = r.execute_command("CLIENT", "LIST").decode().splitlines()
    finally:
        r.close()
    out = {}
    for ln in lines:
        fields = dict(kv.split("=", 1) for kv in ln.split() if "=" in kv)
        out[fields["id"]] = fields
    return out


def _blocked_pushes(server) -> list[str]:
    """Clients of the server blocked in a script call (a push waiting out CLIENT PAUSE)."""
    return [cid for cid, f in _clients(server).items() if f.get("cmd") == "evalsha" and "b" in f.get("flags", "")]


def _new_producer_ready(server, known: set[str]) -> bool:
    """A connection opened after ``known`` that has created its consumer group (a started worker)."""
    return any(cid not in known and f.get("cmd", "").startswith("xgroup") for cid, f in _clients(server).items())


def test_rollout_worker_killed_mid_episode_and_mid_push(fault_env):
    """Two kills: one mid-episode, one while its push waits in Redis. Each is replaced, its
    chunk re-run under the same group ids; every group is produced and consumed exactly once."""
    import ray
    import redis

    tmp_path, server, app = fault_env
    cfg = train_cfg(tmp_path, server.url, app.model_dir, iterations=3, **{"env.max_steps": 4})
    events: dict[str, object] = {}

    def busy_worker(run):
        busy = list(run.pool._busy)
        return busy[0] if busy else None

    def killer(run):
        # Kill 1: a worker with a chunk in flight, half a second in (mid-episode).
        wid = _wait(lambda: busy_worker(run), 180, "a busy rollout worker")
        known = set(_clients(server))
        time.sleep(0.5)
        ray.kill(run.pool.workers[wid], no_restart=True)
        events["mid_episode"] = wid
        # Kill 2: pause Redis writes once the replacement is running a chunk; its push then
        # blocks inside Redis. Kill it there, then let Redis go on.
        _wait(lambda: run.pool.replaced >= 1, 60, "the first replacement")
        wid2 = _wait(lambda: (w := busy_worker(run)) and w != wid and w, 180, "the replacement's chunk")
        # Pause only once the replacement is constructed (its XGROUP CREATE is a write, too).
        _wait(lambda: _new_producer_ready(server, known), 240, "the replacement's buffer connection", step=0.2)
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("CLIENT", "PAUSE", 300_000, "WRITE")
        try:
            blocked = _wait(lambda: _blocked_pushes(server), 280, "a push blocked by CLIENT PAUSE", step=0.2)
            ray.kill(run.pool.workers[wid2], no_restart=True)
            events["mid_push"] = (wid2, blocked)
            time.sleep(1.0)  # the killed worker's connection is gone before writes resume
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()

    run, stats, rows, errors = run_training(cfg, app, during=killer)
    counts = report_counts("rollout worker killed mid-episode + mid-push", stats)
    assert not errors, errors
    assert "mid_episode" in events and "mid_push" in events, events
    assert run.pool.replaced >= 2
    assert_exactly_once(stats, expected_groups=3 * 2)
    assert stats["redelivered"] == 0 and counts["lost"] == 0
    train_rows = [r for r in rows if "policy_version" in r]
    assert len(train_rows) == 3


def test_learner_killed_mid_update_resumes_from_checkpoint(fault_env):
    """Kill the learner after it read iteration 3's groups (iteration 2's are updated but not yet
    checkpointed). The driver restarts it from the checkpoint of iteration 2, the buffer re-delivers
    both iterations' records, and the run ends with the step count and optimizer state of an
    uninterrupted run; nothing was acked before its update was checkpointed."""
    import ray
    import torch

    tmp_path, server, app = fault_env
    cfg = train_cfg(tmp_path, server.url, app.model_dir, iterations=4, checkpoint_every=2)
    n = cfg.learner.groups_per_batch
    seen: dict[str, object] = {}

    def setup(run):
        observer = _stats_client(cfg, run.buffer_url)
        original = run.learn

        def learn(iteration=None):
            if iteration == 3 and "killed" not in seen:
                def kill_when_collected():
                    # Iterations 2 and 3 read, nothing acked since the checkpoint: mid-update.
                    _wait(lambda: observer.stats()["pending"] >= 2 * n, 120, "iteration 3's groups read")
                    ray.kill(run.learner, no_restart=True)
                    seen["killed"] = True
                    seen["at_kill"] = observer.stats()
                    seen["ckpt_at_kill"] = json.loads(
                        (run.out / "checkpoints" / "latest" / "trainer_meta.json").read_text())
                import threading

                threading.Thread(target=kill_when_collected, daemon=True).start()
            return original(iteration)

        run.learn = learn

    run, stats, rows, errors = run_training(cfg, app, setup=setup)
    report_counts("learner killed mid-update", stats)
    assert not errors, errors
    assert seen.get("killed") and run.learner_restarts == 1
    at_kill, ckpt = seen["at_kill"], seen["ckpt_at_kill"]
    # No record acked without its checkpointed update: only the checkpoint's iterations were acked.
    assert ckpt["iteration"] == 2 and at_kill["acked"] == 2 * n, (ckpt, at_kill)
    assert at_kill["pending"] == 2 * n, at_kill
    latest = Path(run.out) / "checkpoints" / "latest"
    meta = json.loads((latest / "trainer_meta.json").read_text())
    assert meta["iteration"] == 4 and meta["step"] == 4, meta  # same count as without the fault
    state = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=False)  # our own local file
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {4}, adam_steps  # optimizer moments continued from the checkpoint, not reset
    assert stats["redelivered"] >= 2 * n  # the dead learner's unacked records came back to its successor
    assert stats["dropped_stale"] == 0  # replayed groups are as fresh as they were the first time
    assert_exactly_once(stats, expected_groups=4 * n)
    train_rows = [r for r in rows if "learner/step" in r]
    assert train_rows and train_rows[-1]["learner/step"] == 4.0


def test_redis_restarted_mid_run_keeps_unacked_records(fault_env):
    """Restart redis-server while iteration 1 runs: iteration 0's records are consumed but not
    acked (checkpoint every 2); AOF keeps them; producers and the learner reconnect."""
    tmp_path, server, app = fault_env
    cfg = train_cfg(tmp_path, server.url, app.model_dir, iterations=3, checkpoint_every=2)
    n = cfg.learner.groups_per_batch
    seen: dict[str, object] = {}

    def restarter(run):
        observer = _stats_client(cfg, run.buffer_url)
        # Iteration 0 learned (its records pending, unacked) and iteration 1's rollout running.
        _wait(lambda: observer.stats()["pending"] >= n and run.pool._busy, 240, "iteration 1 in flight")
        seen["before"] = observer.stats()
        old_pid = server.pid
        server.restart()
        seen["pids"] = (old_pid, server.pid)
        seen["after"] = observer.stats()
        observer.close()

    run, stats, rows, errors = run_training(cfg, app, during=restarter)
    report_counts("redis restarted mid-run", stats)
    assert not errors, errors
    before, after = seen["before"], seen["after"]
    assert seen["pids"][0] != seen["pids"][1]
    assert after["pending"] == before["pending"] >= n  # unacked records survived the restart (AOF)
    assert after["produced"] == before["produced"] and after["acked"] == before["acked"]
    assert_exactly_once(stats, expected_groups=3 * n)
    assert len([r for r in rows if "policy_version" in r]) == 3
