"""Fault injection on the buffer: a consumer killed with SIGKILL, Redis restarted or killed.

Each test owns its redis-server (restarts would disturb the shared one).
Run with ``make test-faults`` (marker ``faults``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.buffer import EmbeddedRedis, TrajectoryBuffer
from services.buffer.synthetic import small_group
from services.config import BufferConfig

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]

_DOOMED_CONSUMER = """
import json, os, sys, time
from services.buffer import TrajectoryBuffer
from services.config import BufferConfig
cfg = BufferConfig(stream=sys.argv[1], claim_idle_ms=int(sys.argv[2]))
buf = TrajectoryBuffer(cfg, os.environ["PROXMO_TEST_REDIS_URL"], consumer="doomed")
got = buf.read(int(sys.argv[3]), block_ms=5000)
print(json.dumps([d.group.group_id for d in got]), flush=True)
time.sleep(600)  # "training": killed before it can ack
"""


def assert_balanced(buf: TrajectoryBuffer) -> dict:
    st = buf.stats()
    assert st["depth"] == 0 and st["pending"] == 0, st
    assert st["produced"] == st["acked"] + st["dead"] + st["dropped_stale"], st
    return st


def drain(buf: TrajectoryBuffer, want: int, timeout_s: float = 15.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += buf.read(64, block_ms=200)
    return got


@pytest.fixture
def server(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="always") as srv:
        yield srv


def test_consumer_killed_before_ack_is_reclaimed_exactly_once(server):
    cfg = BufferConfig(stream="faults:kill9", claim_idle_ms=500, reconnect_timeout_s=10)
    producer = TrajectoryBuffer(cfg, server.url, consumer="producer")
    groups = [small_group(seed=i) for i in range(8)]
    for g in groups:
        producer.push(g)
    env = {**os.environ, "PROXMO_TEST_REDIS_URL": server.url, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _DOOMED_CONSUMER, cfg.stream, "500", "5"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        taken = json.loads(line)
        assert len(taken) == 5
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert producer.stats()["pending"] == 5

    survivor = TrajectoryBuffer(cfg, server.url, consumer="learner-0")
    got = drain(survivor, 8)
    ids = [d.group.group_id for d in got]
    assert sorted(ids) == sorted(g.group_id for g in groups), "each group consumed exactly once"
    assert {d.group.group_id for d in got if d.redelivered} == set(taken)
    assert survivor.read(8, block_ms=700) == []  # nothing comes back a second time
    assert survivor.ack([d.msg_id for d in got]) == 8
    st = assert_balanced(survivor)
    assert (st["produced"], st["consumed"], st["redelivered"], st["acked"]) == (8, 8, 5, 8)
    survivor.close()
    producer.close()


def test_unacked_records_survive_a_redis_restart_with_aof(server):
    cfg = BufferConfig(stream="faults:aof", reconnect_timeout_s=15)
    buf = TrajectoryBuffer(cfg, server.url)
    groups = [small_group(seed=i, policy_version=i) for i in range(6)]
    for g in groups:
        buf.push(g)
    held = buf.read(4, block_ms=1000)  # delivered, not acked (no checkpoint yet)
    buf.ack([held[0].msg_id])
    before = buf.stats()

    port = server.port
    server.restart()  # SIGTERM then start on the same port, password and data dir
    assert server.port == port
    assert (Path(server.data_dir) / "appendonly.aof").exists()

    after = buf.stats()  # the same client reconnects by itself
    assert after == before
    assert (after["pending"], after["depth"], after["acked"]) == (3, 2, 1)

    # The learner restarts too: it gets its 3 unacked groups back, then the 2 never delivered.
    buf.close()
    learner = TrajectoryBuffer(cfg, server.url)
    got = drain(learner, 5)
    assert [d.group.group_id for d in got] == [g.group_id for g in groups[1:]]
    assert [d.redelivered for d in got] == [True] * 3 + [False] * 2
    assert learner.push(groups[2]) == held[2].msg_id  # dedupe memory survived the restart too
    learner.ack([d.msg_id for d in got])
    assert_balanced(learner)
    learner.close()


def test_redis_killed_with_fsync_always_loses_nothing(server):
    cfg = BufferConfig(stream="faults:sigkill", reconnect_timeout_s=15)
    buf = TrajectoryBuffer(cfg, server.url)
    groups = [small_group(seed=i) for i in range(5)]
    for g in groups:
        buf.push(g)
    held = buf.read(2, block_ms=1000)
    server.kill()  # SIGKILL: no shutdown hook, only what fsync put on disk
    server.start()
    st = buf.stats()
    assert (st["produced"], st["pending"], st["depth"]) == (5, 2, 3)
    got = drain(buf, 3)
    buf.ack([d.msg_id for d in held + got])
    assert sorted(d.group.group_id for d in held + got) == sorted(g.group_id for g in groups)
    assert_balanced(buf)
    buf.close()


def test_producers_ride_through_a_redis_restart_without_double_counting(server):
    cfg = BufferConfig(stream="faults:ride", max_depth=1000, reconnect_timeout_s=20)
    producer = TrajectoryBuffer(cfg, server.url, consumer="producer")
    pushed: list[str] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(120):
                g = small_group(seed=i)
                producer.push(g)
                pushed.append(g.group_id)
                time.sleep(0.005)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    th = threading.Thread(target=produce)
    th.start()
    time.sleep(0.2)
    at_restart = len(pushed)
    server.restart()
    th.join(timeout=60)
    assert not errors, errors
    assert len(pushed) == 120
    assert 0 < at_restart < 120, "the restart must fall in the middle of the pushes"
    consumer = TrajectoryBuffer(cfg, server.url)
    got = drain(consumer, 120)
    assert sorted(d.group.group_id for d in got) == sorted(pushed)
    consumer.ack([d.msg_id for d in got])
    st = assert_balanced(consumer)
    assert st["produced"] == 120
    consumer.close()
    producer.close()


_SIGTERM_CHILD = """
import sys, time
from services.cli import exit_cleanly_on_sigterm
from services.buffer import EmbeddedRedis
if sys.argv[1] == "handler":
    exit_cleanly_on_sigterm()
server = EmbeddedRedis()
server.start()
print(server._proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.parametrize("handler", [True, False])
def test_sigterm_to_the_cli_stops_the_embedded_redis(handler):
    """`proxmo ...` killed with SIGTERM (pkill, a pod stopping) must not orphan its redis-server.

    Without the CLI's handler, Python's default SIGTERM skips atexit and the server
    outlives its driver: that case is asserted too, so the test shows what the handler fixes.
    """
    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, "handler" if handler else "plain"],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    redis_pid = int(child.stdout.readline())
    try:
        assert _alive(redis_pid)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == (143 if handler else -signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(redis_pid) is (not handler)
    finally:
        child.kill()
        if _alive(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
