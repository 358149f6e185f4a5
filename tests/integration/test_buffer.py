"""The trajectory buffer against a real redis-server (one per session; one stream per test).

Every test ends with the accounting invariant: nothing left in the stream, and
produced == acked + dead + dropped_stale (garbage written around push is
counted separately as dead_foreign).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np
import pytest

from services.buffer import (
    BackpressureTimeout,
    EmbeddedRedis,
    RedisAuthError,
    RedisUnavailableError,
    TrajectoryBuffer,
    connect_redis,
)
from services.buffer.synthetic import small_group
from services.contracts import RecordError, encode_group


def drain(buf: TrajectoryBuffer, want: int, timeout_s: float = 10.0, max_groups: int = 64):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += buf.read(max_groups, block_ms=200)
    return got


def assert_balanced(buf: TrajectoryBuffer) -> dict:
    st = buf.stats()
    assert st["depth"] == 0 and st["pending"] == 0, st
    assert st["produced"] == st["acked"] + st["dead"] + st["dropped_stale"], st
    return st


@pytest.fixture
def buf(buffer_cfg, redis_url):
    b = TrajectoryBuffer(buffer_cfg, redis_url)
    yield b
    b.close()


def test_push_read_ack_round_trip(buf):
    groups = [small_group(policy_version=v, seed=v) for v in range(5)]
    ids = [buf.push(g) for g in groups]
    assert len(set(ids)) == 5
    st = buf.stats()
    assert (st["produced"], st["depth"], st["pending"], st["consumed"]) == (5, 5, 0, 0)

    got = buf.read(10, block_ms=1000)
    assert [d.msg_id for d in got] == ids  # stream order
    for d, g in zip(got, groups, strict=True):
        assert not d.redelivered and d.nbytes > 0
        assert d.group.group_id == g.group_id and d.group.policy_version == g.policy_version
        np.testing.assert_array_equal(d.group.episodes[3].steps[2].prompt_ids, g.episodes[3].steps[2].prompt_ids)
        np.testing.assert_array_equal(d.group.episodes[0].steps[1].logprobs, g.episodes[0].steps[1].logprobs)
    st = buf.stats()
    assert (st["consumed"], st["depth"], st["pending"]) == (5, 0, 5)
    assert buf.read(10, block_ms=0) == []  # nothing is delivered twice to a live consumer

    assert buf.ack(ids[:2]) == 2
    assert buf.ack(ids) == 3  # already-settled ids do not count again
    assert buf.ack(ids) == 0
    st = assert_balanced(buf)
    assert st["acked"] == 5
    assert buf._r.xlen(buf.stream) == 0  # settled entries are deleted: memory stays bounded


def test_duplicate_push_is_counted_once(buf):
    g = small_group()
    first = buf.push(g)
    again = buf.push(g)  # what a producer retrying after a lost reply does
    assert again == first
    st = buf.stats()
    assert (st["produced"], st["duplicates"], st["depth"]) == (1, 1, 1)
    got = drain(buf, 1)
    assert len(got) == 1
    buf.ack([d.msg_id for d in got])
    assert_balanced(buf)


def test_read_blocks_until_a_push(buf, buffer_cfg, redis_url):
    t0 = time.monotonic()
    assert buf.read(4, block_ms=300) == []
    assert time.monotonic() - t0 >= 0.29

    producer = TrajectoryBuffer(buffer_cfg, redis_url, consumer="producer")
    g = small_group(seed=7)
    timer = threading.Timer(0.4, producer.push, args=(g,))
    t0 = time.monotonic()
    timer.start()
    got = buf.read(4, block_ms=10_000)
    waited = time.monotonic() - t0
    timer.join()
    producer.close()
    assert [d.group.group_id for d in got] == [g.group_id]
    assert 0.35 <= waited < 5.0, waited  # woken by the XADD, not by the timeout
    buf.ack([got[0].msg_id])
    assert_balanced(buf)


def test_drained_reader_waits_for_the_push_tick_then_reads_once(buf, buffer_cfg, redis_url):
    # After a read that left nothing behind, read waits on <stream>:tick (not on the
    # stream, whose new entry XREAD would send whole) and then reads once: no empty read.
    producer = TrajectoryBuffer(buffer_cfg, redis_url, consumer="producer")
    producer.push(small_group(seed=1))
    first = buf.read(4, block_ms=1000)  # 1 of 4: drained
    assert len(first) == 1
    reads = []
    read_once = buf._read_once
    buf._read_once = lambda n: reads.append(n) or read_once(n)
    timer = threading.Timer(0.2, producer.push, args=(small_group(seed=2),))
    t0 = time.monotonic()
    timer.start()
    got = buf.read(4, block_ms=10_000)
    waited = time.monotonic() - t0
    timer.join()
    assert len(got) == 1 and len(reads) == 1
    assert 0.15 <= waited < 0.9, waited  # woken by the tick, not by the 1 s periodic wake-up
    client = connect_redis(redis_url)
    assert client.xlen(f"{buffer_cfg.stream}:tick") == 1  # trimmed to the newest
    client.close()
    producer.close()
    buf.ack([d.msg_id for d in first + got])
    assert_balanced(buf)


def test_malformed_entries_go_to_dead_letter_and_reading_goes_on(buf):
    good = [small_group(seed=i) for i in range(3)]
    r = buf._r
    buf.push(good[0])
    r.xadd(buf.stream, {"junk": b"no payload"})
    r.xadd(buf.stream, {"gid": b"x", "d": b"PXG1\x00\xc1garbage"})
    buf.push(good[1])
    r.xadd(buf.stream, {"gid": b"y", "d": encode_group(small_group(seed=9))[:-10]})
    r.xadd(buf.stream, {"gid": b"not-the-record-id", "d": encode_group(small_group(seed=10))})
    buf.push(good[2])
    got = drain(buf, 3, timeout_s=5)
    assert [d.group.group_id for d in got] == [g.group_id for g in good]
    st = buf.stats()
    assert (st["dead_foreign"], st["dead"], st["pending"]) == (4, 0, 3)
    dl = buf.dead_letters()
    reasons = [d["dead_reason"] for d in dl]
    assert len(reasons) == 4
    assert "missing field 'd'" in reasons[0]
    assert "truncated or corrupt" in reasons[1]
    assert "corrupt" in reasons[2]  # truncated zstd frame
    assert "does not match the record's group_id" in reasons[3]
    assert all(d["dead_consumer"] == "learner-0" and d["dead_id"] for d in dl)
    assert buf.ack([d.msg_id for d in got]) == 3
    assert_balanced(buf)


def test_pushed_record_rejected_by_reader_counts_as_dead(buf, buffer_cfg, redis_url):
    # Produced through push but bigger than this reader accepts: dead, and balanced against produced.
    strict = TrajectoryBuffer(dataclasses.replace(buffer_cfg, max_record_bytes=200), redis_url, consumer="strict")
    for i in range(2):
        buf.push(small_group(seed=i))
    assert strict.read(8, block_ms=0) == []
    st = assert_balanced(strict)
    assert (st["produced"], st["dead"], st["dead_foreign"]) == (2, 2, 0)
    assert all("exceeds the limit of 200" in d["dead_reason"] for d in strict.dead_letters())
    strict.close()


def test_consumer_keeps_going_after_garbage(buf):
    buf.push(small_group(seed=1))
    buf._r.xadd(buf.stream, {"d": b"\x00\x01 not msgpack"})
    buf.push(small_group(seed=2))
    got = drain(buf, 2)
    assert len(got) == 2
    assert buf.ack([d.msg_id for d in got]) == 2
    st = assert_balanced(buf)
    assert (st["dead_foreign"], st["acked"]) == (1, 2)


def test_backpressure_blocks_then_times_out(buffer_cfg, redis_url, caplog):
    cfg = dataclasses.replace(buffer_cfg, max_depth=2, push_timeout_s=0.6)
    buf = TrajectoryBuffer(cfg, redis_url)
    buf.push(small_group(seed=1))
    buf.push(small_group(seed=2))
    caplog.set_level(logging.WARNING, logger="services.buffer.trajectory_buffer")
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout, match=r"depth 2 >= max_depth 2.*was not added"):
        buf.push(small_group(seed=3))
    assert time.monotonic() - t0 >= 0.6
    assert any("full (depth 2 >= max_depth 2)" in r.getMessage() for r in caplog.records)
    assert buf.stats()["produced"] == 2  # nothing trimmed, nothing added

    # A blocked producer goes on as soon as the learner takes a group.
    done = threading.Event()
    cfg_wait = dataclasses.replace(cfg, push_timeout_s=10.0)
    producer = TrajectoryBuffer(cfg_wait, redis_url, consumer="producer")
    th = threading.Thread(target=lambda: (producer.push(small_group(seed=4)), done.set()))
    th.start()
    time.sleep(0.3)
    assert not done.is_set()
    got = buf.read(1, block_ms=1000)
    assert done.wait(5.0)
    th.join()
    got += drain(buf, 2)
    assert len(got) == 3
    buf.ack([d.msg_id for d in got])
    assert_balanced(buf)
    producer.close()
    buf.close()


def test_staleness_split_keeps_groups_whole(buffer_cfg, redis_url):
    cfg = dataclasses.replace(buffer_cfg, max_staleness=1)
    buf = TrajectoryBuffer(cfg, redis_url)
    for v in range(5):
        buf.push(small_group(policy_version=v, seed=v))
    got = drain(buf, 5)
    fresh, stale = buf.split_stale(got, current_version=4)
    assert sorted(d.group.policy_version for d in fresh) == [3, 4]
    assert sorted(d.group.policy_version for d in stale) == [0, 1, 2]
    assert all(len(d.group.episodes) == 8 for d in fresh + stale)
    st = buf.stats()
    assert (st["dropped_stale"], st["pending"]) == (3, 2)
    assert buf.ack([d.msg_id for d in stale]) == 0  # already settled as dropped
    assert buf.ack([d.msg_id for d in fresh]) == 2
    st = assert_balanced(buf)
    assert (st["acked"], st["dropped_stale"]) == (2, 3)
    buf.close()


def test_idle_consumer_entries_are_reclaimed_exactly_once(buffer_cfg, redis_url):
    cfg = dataclasses.replace(buffer_cfg, claim_idle_ms=300)
    a = TrajectoryBuffer(cfg, redis_url, consumer="learner-a")
    b = TrajectoryBuffer(cfg, redis_url, consumer="learner-b")
    groups = [small_group(seed=i) for i in range(6)]
    for g in groups:
        a.push(g)
    taken_by_a = a.read(3, block_ms=500)
    assert len(taken_by_a) == 3
    a.close()  # learner-a dies without acking
    got = drain(b, 6, timeout_s=5)
    ids = [d.group.group_id for d in got]
    assert sorted(ids) == sorted(g.group_id for g in groups)  # each exactly once
    redelivered = {d.group.group_id for d in got if d.redelivered}
    assert redelivered == {d.group.group_id for d in taken_by_a}
    assert b.ack([d.msg_id for d in got]) == 6
    st = assert_balanced(b)
    assert (st["consumed"], st["redelivered"], st["acked"]) == (6, 3, 6)
    b.close()


def test_live_consumer_keeps_its_entries_by_touching(buffer_cfg, redis_url):
    cfg = dataclasses.replace(buffer_cfg, claim_idle_ms=400)
    a = TrajectoryBuffer(cfg, redis_url, consumer="learner-a")
    b = TrajectoryBuffer(cfg, redis_url, consumer="learner-b")
    for i in range(2):
        a.push(small_group(seed=i))
    held = a.read(2, block_ms=500)
    for _ in range(6):  # a long update: 0.9 s > claim_idle_ms, with heartbeats
        time.sleep(0.15)
        assert a.touch() == 2
    assert b.read(4, block_ms=0) == []
    assert a.ack([d.msg_id for d in held]) == 2
    assert_balanced(a)
    a.close()
    b.close()


def test_restarted_consumer_recovers_its_own_pending_at_once(buffer_cfg, redis_url):
    first = TrajectoryBuffer(buffer_cfg, redis_url, consumer="learner-0")
    for i in range(4):
        first.push(small_group(seed=i))
    held = first.read(3, block_ms=500)
    first.close()  # crash before the checkpoint: nothing acked
    second = TrajectoryBuffer(buffer_cfg, redis_url, consumer="learner-0")  # claim_idle_ms is 60 s
    got = drain(second, 4, timeout_s=3)
    assert [d.msg_id for d in got[:3]] == [d.msg_id for d in held]
    assert [d.redelivered for d in got] == [True, True, True, False]
    second.ack([d.msg_id for d in got])
    assert_balanced(second)
    second.close()


def test_concurrent_producers_and_consumer_balance(buffer_cfg, redis_url):
    cfg = dataclasses.replace(buffer_cfg, max_depth=8)
    consumer = TrajectoryBuffer(cfg, redis_url)
    producers = [TrajectoryBuffer(cfg, redis_url, consumer=f"p{i}") for i in range(4)]
    pushed: list[str] = []
    lock = threading.Lock()

    def produce(p: TrajectoryBuffer, k: int) -> None:
        for j in range(15):
            g = small_group(seed=100 * k + j)
            p.push(g)
            if j % 5 == 0:
                p.push(g)  # retried pushes never double count
            with lock:
                pushed.append(g.group_id)

    threads = [threading.Thread(target=produce, args=(p, k)) for k, p in enumerate(producers)]
    for t in threads:
        t.start()
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 60 and time.monotonic() < deadline:
        got = consumer.read(8, block_ms=200)
        seen += [d.group.group_id for d in got]
        consumer.ack([d.msg_id for d in got])
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(pushed) and len(set(seen)) == 60
    st = assert_balanced(consumer)
    assert (st["produced"], st["duplicates"], st["acked"]) == (60, 12, 60)
    for p in producers:
        p.close()
    consumer.close()


def test_oversized_push_is_refused_and_nothing_written(buffer_cfg, redis_url):
    cfg = dataclasses.replace(buffer_cfg, max_record_bytes=1000)
    buf = TrajectoryBuffer(cfg, redis_url)
    with pytest.raises(RecordError, match="exceeds buffer.max_record_bytes=1000"):
        buf.push(small_group())
    assert buf._r.xlen(buf.stream) == 0
    assert buf.stats()["produced"] == 0
    buf.close()


def test_wrong_password_is_a_clear_error(redis_server, buffer_cfg):
    bad = f"redis://:wrong-password@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(RedisAuthError, match="rejected the password") as info:
        connect_redis(bad, timeout_s=2)
    assert "wrong-password" not in str(info.value)  # never leak credentials into logs
    with pytest.raises(RedisAuthError, match="requires a password; the URL has none"):
        connect_redis(f"redis://127.0.0.1:{redis_server.port}/0", timeout_s=2)
    with pytest.raises(RedisAuthError):
        TrajectoryBuffer(buffer_cfg, bad)


def test_unreachable_server_is_a_clear_error():
    from services.buffer.redis_server import _free_port

    t0 = time.monotonic()
    with pytest.raises(RedisUnavailableError, match="did not answer PING within 1 s"):
        connect_redis(f"redis://:pw@127.0.0.1:{_free_port()}/0", timeout_s=1)
    assert time.monotonic() - t0 < 5
    with pytest.raises(RedisUnavailableError, match="not a Redis URL"):
        connect_redis("http://localhost:6379")


def test_embedded_server_lifecycle(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    url = server.start()
    assert url.startswith("redis://:") and f"@127.0.0.1:{server.port}/0" in url
    assert server.password in url and len(server.password) >= 24
    client = connect_redis(url)
    cfg = client.config_get("appendonly")
    assert cfg["appendonly" if "appendonly" in cfg else b"appendonly"] in ("yes", b"yes")
    bind = client.config_get("bind")
    assert list(bind.values())[0] in ("127.0.0.1", b"127.0.0.1")
    client.set("k", "v")
    client.close()
    conf = tmp_path / "redis" / "redis.conf"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"  # the password is not world-readable
    server.stop()
    assert not server.running()
    assert (tmp_path / "redis").exists()  # a given data dir is kept

    with EmbeddedRedis() as temp:
        data_dir = temp.data_dir
        assert data_dir is not None and data_dir.exists()
        assert connect_redis(temp.url).ping()
    assert not data_dir.exists()  # a temporary one is removed


def test_embedded_server_is_stopped_at_interpreter_exit():
    import os
    import subprocess
    import sys

    code = (
        "from services.buffer import EmbeddedRedis\n"
        "print(EmbeddedRedis().start() and 'up', flush=True)\n"  # object not kept on purpose
        "import gc; gc.collect()\n"
        "from services.buffer import redis_server\n"
        "print([s.pid for s in redis_server._LIVE][0], flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_resolve_redis_prefers_configured_url(monkeypatch):
    from services.buffer import resolve_redis

    monkeypatch.setenv("REDIS_URL", "redis://:env@10.0.0.1:6379/0")
    assert resolve_redis("rediss://:cfg@example:6380/1") == ("rediss://:cfg@example:6380/1", None)
    assert resolve_redis("") == ("redis://:env@10.0.0.1:6379/0", None)
    monkeypatch.delenv("REDIS_URL")
    url, server = resolve_redis("")
    try:
        assert server is not None and server.running() and url == server.url
        assert connect_redis(url).ping()
    finally:
        server.stop()
