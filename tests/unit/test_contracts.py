"""Round trips of the group record contract, and every kind of malformed record."""

from __future__ import annotations

import math
import struct
import threading

import msgpack
import numpy as np
import pytest
import zstandard

from services.buffer.synthetic import make_group, small_group
from services.contracts import (
    MAGIC,
    SCHEMA_VERSION,
    EpisodeRecord,
    GroupRecord,
    RecordError,
    StepRecord,
    decode_group,
    encode_group,
)


def _assert_same(a: GroupRecord, b: GroupRecord) -> None:
    for name in ("task_id", "env_name", "task_type", "worker_id", "policy_version", "group_id",
                 "created_at", "finished_at", "schema_version"):
        assert getattr(a, name) == getattr(b, name), name
    assert len(a.episodes) == len(b.episodes)
    for ea, eb in zip(a.episodes, b.episodes, strict=True):
        assert (ea.won, ea.score, ea.task_type, ea.infra_failure, ea.failure_reason) == (
            eb.won, eb.score, eb.task_type, eb.infra_failure, eb.failure_reason)
        assert len(ea.steps) == len(eb.steps)
        for sa, sb in zip(ea.steps, eb.steps, strict=True):
            assert (sa.observation, sa.action, sa.reward, sa.valid, sa.done, sa.policy_version, sa.info) == (
                sb.observation, sb.action, sb.reward, sb.valid, sb.done, sb.policy_version, sb.info)
            np.testing.assert_array_equal(sa.prompt_ids, sb.prompt_ids)
            np.testing.assert_array_equal(sa.response_ids, sb.response_ids)
            np.testing.assert_array_equal(sa.logprobs, sb.logprobs)
            assert sb.prompt_ids.dtype == np.int32 and sb.logprobs.dtype == np.float32
            assert sb.response_ids.dtype == np.int32
            # the learner may edit arrays in place: decoded arrays are writable, never read-only wire views
            assert sb.prompt_ids.flags.writeable and sb.response_ids.flags.writeable and sb.logprobs.flags.writeable


def _unframe(data: bytes) -> dict:
    """The head of an uncompressed record with its three columns put back as ``steps`` p/q/lp bytes.

    Layout (schema 4): MAGIC | flags | u32 LE head length | msgpack head | zero pad to 4 | p | q | lp.
    """
    assert data[4] == 0
    payload = data[5:]
    (n,) = struct.unpack_from("<I", payload)
    body = msgpack.unpackb(payload[4:4 + n], raw=False)
    pos = (4 + n + 3) & ~3
    for key, nb in zip(("p", "q", "lp"), body["steps"].pop("cb"), strict=True):
        body["steps"][key] = payload[pos:pos + nb]
        pos += nb
    assert pos == len(payload)
    return body


def _body(g: GroupRecord) -> dict:
    """The head and columns of an uncompressed encoding, for surgical corruption."""
    return _unframe(encode_group(g, compress_min_bytes=1 << 40))


def _pack(body: dict) -> bytes:
    """Frame ``body`` as ``_unframe`` reads it; ``cb`` is derived from the columns unless set."""
    steps = dict(body["steps"])
    cols = [steps.pop(k, b"") for k in ("p", "q", "lp")]
    steps.setdefault("cb", [len(c) for c in cols])
    head = msgpack.packb({**body, "steps": steps}, use_bin_type=True)
    pad = b"\x00" * (-(4 + len(head)) % 4)
    return MAGIC + b"\x00" + struct.pack("<I", len(head)) + head + pad + b"".join(cols)


def test_round_trip_small_uncompressed():
    g = small_group(policy_version=3, seed=1)
    g.episodes[1].infra_failure = True
    g.episodes[1].failure_reason = "env step timed out"
    g.finished_at = g.created_at + 1.5
    data = encode_group(g, compress_min_bytes=1 << 40)
    assert data[:4] == MAGIC and data[4] == 0
    _assert_same(g, decode_group(data))


def test_round_trip_realistic_group_is_compressed_and_smaller():
    g = make_group(episodes=8, steps=50, prompt_tokens=1000)
    data = encode_group(g)
    raw = encode_group(g, compress_min_bytes=1 << 40)
    assert data[4] == 1, "a 1.6 MB group with shared prompt prefixes should be stored compressed"
    assert len(data) < len(raw) / 2
    _assert_same(g, decode_group(data))


def test_incompressible_payload_is_stored_raw():
    rng = np.random.default_rng(0)
    step = StepRecord("o", "a", 0.0, True, True, prompt_ids=rng.integers(0, 2**31 - 1, 4000),
                      response_ids=np.zeros(2000, np.int32), logprobs=-rng.random(2000).astype(np.float32))
    step.response_ids = rng.integers(0, 2**31 - 1, 2000).astype(np.int32)
    g = GroupRecord("t", [EpisodeRecord([step])])
    data = encode_group(g, compress_min_bytes=16)
    assert data[4] == 0  # zstd would not shrink random 31-bit ids: no point paying to decompress
    _assert_same(g, decode_group(data))


def test_empty_steps_and_unicode_survive():
    g = GroupRecord("täsk-✓", [EpisodeRecord(steps=[], infra_failure=True, failure_reason="crash ✗")])
    _assert_same(g, decode_group(encode_group(g)))


@pytest.mark.parametrize("cut", [0, 3, 5, 40, -1])
def test_truncated(cut):
    data = encode_group(small_group())
    with pytest.raises(RecordError):
        decode_group(data[:cut] if cut >= 0 else data[:-7])


def test_truncated_compressed():
    data = encode_group(make_group(episodes=2, steps=5, prompt_tokens=500))
    assert data[4] == 1
    with pytest.raises(RecordError, match="compressed"):
        decode_group(data[: len(data) // 2])


def test_wrong_magic_and_flags():
    data = encode_group(small_group())
    with pytest.raises(RecordError, match="magic"):
        decode_group(b"XXXX" + data[4:])
    with pytest.raises(RecordError, match="flags"):
        decode_group(data[:4] + b"\x06" + data[5:])
    with pytest.raises(RecordError, match="bytes"):
        decode_group("not bytes")  # type: ignore[arg-type]


def test_pickle_is_not_a_record():
    import pickle

    with pytest.raises(RecordError, match="magic"):
        decode_group(pickle.dumps({"v": SCHEMA_VERSION}))


@pytest.mark.parametrize("version", [0, 2, SCHEMA_VERSION + 1, "1", None])
def test_wrong_schema_version(version):
    body = _body(small_group())
    body["v"] = version
    with pytest.raises(RecordError, match="schema version"):
        decode_group(_pack(body))


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("task_id",), 7, "task_id: expected str"),
        (("pv",), "3", "pv: expected int"),
        (("pv",), True, "pv: expected int"),
        (("eps",), {}, "eps: expected list"),
        (("eps", 0, "won"), 1, "won: expected bool"),
        (("eps", 0, "n"), 99, "values for"),
        (("steps", "r"), "1.0", "steps.r: expected bytes"),
        (("steps", "r"), b"\x00" * 8, "steps.r: 1 values for 24 steps"),
        (("steps", "ok"), 1, "steps.ok: expected bytes"),
        (("steps", "ok"), b"\x02" * 24, "booleans must be 0 or 1"),
        (("steps", "cb"), "12", "steps.cb: expected list"),
        (("steps", "cb"), [1, 2], "expected 3 column byte lengths"),
        (("steps", "cb"), [-2, 1, 1], "expected 3 column byte lengths"),
        (("steps", "i"), {}, "steps.i: expected list"),
        (("steps", "q"), b"\x01\x00\x00", "multiple of 2"),
        (("steps", "tw"), 3, "token width must be 2 or 4"),
        (("steps", "tw"), "2", "steps.tw: expected int"),
        (("steps", "pl"), np.full(24, -1, "<i8").tobytes(), "negative length"),
    ],
)
def test_wrong_types(path, value, match):
    body = _body(small_group())
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(RecordError, match=match):
        decode_group(_pack(body))


def test_wrong_type_inside_a_column_names_the_step():
    body = _body(small_group())
    body["steps"]["i"][4] = [1]
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[1\]\.i: expected dict"):
        decode_group(_pack(body))


def _frame_head(head: dict) -> bytes:
    """A record of ``head`` alone (no column bytes)."""
    packed = msgpack.packb(head, use_bin_type=True)
    return MAGIC + b"\x00" + struct.pack("<I", len(packed)) + packed + b"\x00" * (-(4 + len(packed)) % 4)


def test_missing_field():
    body = _body(small_group())
    del body["steps"]["o"]
    with pytest.raises(RecordError, match="missing field 'o'"):
        decode_group(_pack(body))
    body = _body(small_group())
    body["steps"] = {k: v for k, v in body["steps"].items() if k not in ("p", "q", "lp")}
    with pytest.raises(RecordError, match="missing field 'cb'"):
        decode_group(_frame_head(body))


@pytest.mark.parametrize("change", ["short", "long"])
def test_column_bytes_must_match_the_declared_lengths(change):
    data = encode_group(small_group(), compress_min_bytes=1 << 40)
    bad = data[:-2] if change == "short" else data + b"\x00\x00"
    with pytest.raises(RecordError, match="truncated or padded record"):
        decode_group(bad)


def test_head_length_beyond_the_payload():
    data = bytearray(encode_group(small_group(), compress_min_bytes=1 << 40))
    data[5:9] = struct.pack("<I", len(data))
    with pytest.raises(RecordError, match="truncated or corrupt record: header of"):
        decode_group(bytes(data))


def test_schema_3_record_names_its_version():
    # Schema 3 kept the columns inside the msgpack map; this build refuses it by name.
    old = msgpack.packb({"v": 3, "task_id": "t", "steps": {}}, use_bin_type=True)
    with pytest.raises(RecordError, match=r"unsupported schema version 3 \(this build reads 4\)"):
        decode_group(_frame_head({"v": 3, "task_id": "t", "steps": {}}))
    with pytest.raises(RecordError):  # a raw schema-3 byte string has no head length: still a RecordError
        decode_group(MAGIC + b"\x00" + old)


def test_encodings_do_not_share_memory_across_calls_or_threads():
    """encode_group reuses per-thread scratch buffers; its results must be independent bytes."""
    groups = [make_group(episodes=2, steps=6, prompt_tokens=300, seed=s) for s in range(4)]
    first = [encode_group(g) for g in groups]
    again = [encode_group(g, compress_min_bytes=1 << 40) for g in groups]
    for g, a, b in zip(groups, first, again, strict=True):
        _assert_same(g, decode_group(a))
        _assert_same(g, decode_group(b))
    out: dict[int, list[bytes]] = {}

    def work(k: int) -> None:
        out[k] = [encode_group(groups[(k + i) % 4], compress_min_bytes=1 << 40) for i in range(20)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, datas in out.items():
        for i, data in enumerate(datas):
            assert data == again[(k + i) % 4]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_rejected_on_both_sides(bad):
    g = small_group()
    g.episodes[0].steps[0].reward = bad
    with pytest.raises(RecordError, match="reward: not finite"):
        encode_group(g)
    body = _body(small_group())
    r = np.zeros(24, "<f8")
    r[5] = bad
    body["steps"]["r"] = r.tobytes()
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[2\]\.reward: not finite"):
        decode_group(_pack(body))


def test_non_finite_logprob_rejected():
    g = small_group()
    g.episodes[0].steps[1].logprobs[2] = np.nan
    with pytest.raises(RecordError, match="logprobs: not all finite"):
        encode_group(g)


def test_mismatched_logprob_length_rejected_on_both_sides():
    g = small_group()
    g.episodes[0].steps[0].logprobs = np.zeros(3, np.float32)
    with pytest.raises(RecordError, match="3 log-probs for 8 response tokens"):
        encode_group(g)
    body = _body(small_group())
    body["steps"]["lp"] = body["steps"]["lp"][:-4]  # one log-prob short somewhere
    with pytest.raises(RecordError, match="logprobs: lengths add up to 192, buffer holds 191"):
        decode_group(_pack(body))


def test_token_ids_are_checked():
    with pytest.raises(RecordError, match="outside"):
        StepRecord("o", "a", 0.0, True, True, prompt_ids=np.array([1, 2**40], np.int64))
    with pytest.raises(RecordError, match="1-D"):
        StepRecord("o", "a", 0.0, True, True, prompt_ids=np.zeros((2, 3), np.int32))
    with pytest.raises(RecordError, match="integers"):
        StepRecord("o", "a", 0.0, True, True, response_ids=np.array([0.5]))
    body = _body(small_group())
    assert body["steps"]["tw"] == 2  # uint16 on the wire cannot hold -1: forge an int32 record
    body["steps"]["tw"] = 4
    p = np.frombuffer(body["steps"]["p"], "<u2").astype("<i4")
    p[64 * 3 + 1] = -1  # episode 1, step 0
    body["steps"]["p"] = p.tobytes()
    body["steps"]["q"] = np.frombuffer(body["steps"]["q"], "<u2").astype("<i4").tobytes()
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[0\]\.prompt_ids: negative token id"):
        decode_group(_pack(body))


def test_group_without_episodes_or_id():
    with pytest.raises(RecordError, match="no episodes"):
        encode_group(GroupRecord("t", []))
    g = small_group()
    g.group_id = ""
    with pytest.raises(RecordError, match="group_id"):
        encode_group(g)


def test_unencodable_info_is_a_record_error():
    g = small_group()
    g.episodes[0].steps[0].info = {"obj": object()}
    with pytest.raises(RecordError, match="cannot encode"):
        encode_group(g)


def test_oversized_record_rejected():
    data = encode_group(make_group(episodes=2, steps=10, prompt_tokens=200), compress_min_bytes=1 << 40)
    with pytest.raises(RecordError, match="exceeds the limit"):
        decode_group(data, max_bytes=len(data) - 1)
    decode_group(data, max_bytes=len(data))  # exactly at the limit is fine


def test_decompression_bomb_rejected_before_allocation():
    # A small compressed frame whose header says it expands to 64 MiB.
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20))
    assert len(bomb) < 100_000
    with pytest.raises(RecordError, match="expands to 67108864 bytes"):
        decode_group(MAGIC + b"\x01" + bomb, max_bytes=1 << 20)
    # Without a size in the header the decompressor's own limit applies.
    streamed = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\x00" * (4 << 20))
    with pytest.raises(RecordError, match="over-limit"):
        decode_group(MAGIC + b"\x01" + streamed, max_bytes=1 << 20)


# --------------------------------------------------------------------------- schema 3 layout


@pytest.mark.parametrize("top, width", [(0, 2), (65_535, 2), (65_536, 4), (2**31 - 1, 4)])
def test_token_width_follows_the_largest_id(top, width):
    g = small_group()
    g.episodes[2].steps[1].response_ids[3] = top
    data = encode_group(g, compress_min_bytes=1 << 40)
    body = _unframe(data)
    assert body["steps"]["tw"] == width
    assert len(body["steps"]["p"]) == width * sum(len(s.prompt_ids) for e in g.episodes for s in e.steps)
    out = decode_group(data)
    assert out.episodes[2].steps[1].response_ids[3] == top
    _assert_same(g, out)


def test_large_vocabulary_group_round_trips_compressed():
    g = make_group(episodes=2, steps=10, prompt_tokens=300, vocab=151_000, seed=4)
    data = encode_group(g)
    assert data[4] == 1
    _assert_same(g, decode_group(data))


def test_episodes_without_steps_between_others():
    g = small_group()
    g.episodes[0].steps = []
    g.episodes[4].steps = []
    g.episodes[7].steps = []
    out = decode_group(encode_group(g))
    assert [len(e.steps) for e in out.episodes] == [0, 3, 3, 3, 0, 3, 3, 0]
    _assert_same(g, out)


def test_decoded_steps_are_independent_arrays():
    g = small_group()
    out = decode_group(encode_group(g))
    first, second = out.episodes[0].steps[0], out.episodes[0].steps[1]
    before = second.prompt_ids.copy()
    first.prompt_ids[:] = 7  # views of one buffer, but cut at the step boundaries
    np.testing.assert_array_equal(second.prompt_ids, before)
    assert len(first.prompt_ids) == len(g.episodes[0].steps[0].prompt_ids)


def test_fields_reassigned_after_construction_are_checked_at_encode():
    g = small_group()
    g.episodes[1].steps[2].prompt_ids = [1, 2, 3]  # plain list: converted, not refused
    out = decode_group(encode_group(g))
    assert out.episodes[1].steps[2].prompt_ids.tolist() == [1, 2, 3]
    g.episodes[1].steps[2].prompt_ids = np.array([0.5, 1.5])
    with pytest.raises(RecordError, match="prompt_ids must hold integers"):
        encode_group(g)
    g = small_group()
    g.episodes[0].steps[0].logprobs = np.zeros((8, 1), np.float32)  # right length, wrong shape
    with pytest.raises(RecordError, match="logprobs"):
        encode_group(g)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("observation", 5, r"episodes\[1\]\.steps\[2\]\.observation: expected str, got int"),
        ("action", None, r"episodes\[1\]\.steps\[2\]\.action: expected str"),
        ("info", [1], r"episodes\[1\]\.steps\[2\]\.info: expected dict"),
        ("reward", "ten", r"episodes\[1\]\.steps\[2\]\.reward: expected a number"),
        ("policy_version", 1.5, r"episodes\[1\]\.steps\[2\]\.policy_version: expected an integer"),
        ("policy_version", 2**70, r"episodes\[1\]\.steps\[2\]\.policy_version: expected an integer"),
    ],
)
def test_wrong_step_field_types_fail_at_the_producer(field, value, match):
    g = small_group()
    setattr(g.episodes[1].steps[2], field, value)
    with pytest.raises(RecordError, match=match):
        encode_group(g)


def test_numpy_scalars_and_str_subclasses_are_accepted():
    class Obs(str):
        pass

    g = small_group()
    s = g.episodes[0].steps[0]
    s.observation, s.reward, s.policy_version, s.valid = Obs("room"), np.float32(2.5), np.int64(4), np.bool_(False)
    out = decode_group(encode_group(g)).episodes[0].steps[0]
    assert (out.observation, out.reward, out.policy_version, out.valid) == ("room", 2.5, 4, False)
    assert type(out.observation) is str and type(out.reward) is float and type(out.valid) is bool


# --------------------------------------------------------------------------- reused memory


def test_recycled_blocks_are_reused_only_after_every_view_is_gone():
    import gc

    from services.wire_memory import RecycledBlocks

    pool = RecycledBlocks(max_bytes=1 << 22, min_block=1 << 10)
    a = pool.take(4096)
    a[:] = 7
    part = a.view(np.int32)[10:20]  # a step's slice keeps the whole block alive
    addr = a.ctypes.data
    del a
    gc.collect()
    assert pool.free_bytes == 0
    b = pool.take(4096)
    assert b.ctypes.data != addr and (part == 0x07070707).all()
    del part, b
    gc.collect()
    assert pool.free_bytes == 2 * 4096
    c = pool.take(3000)  # a free block of up to twice the size is reused
    assert len(c) == 3000 and pool.free_bytes == 4096 and c.flags.writeable
    assert len(pool.take(100)) == 100  # under min_block: a plain allocation


def test_decoded_prompts_of_live_groups_never_share_memory():
    groups = [make_group(episodes=4, steps=20, prompt_tokens=1000, seed=s) for s in range(6)]  # 320 KB of ids: pooled
    live = []
    for i, g in enumerate(groups):
        out = decode_group(encode_group(g))
        if i % 2:
            live.append((i, out))  # the others are dropped at once: their memory may be reused
    for i, out in live:
        _assert_same(groups[i], out)
    blocks = [o.episodes[0].steps[0].prompt_ids.base for _, o in live]
    assert all(type(b.base) is memoryview for b in blocks)  # recycled blocks, not plain arrays
    assert len({id(b) for b in blocks}) == len(blocks)
    for _, out in live:
        out.episodes[0].steps[0].prompt_ids[:] = -1  # a learner editing in place touches only its own group
    for i, out in live:
        np.testing.assert_array_equal(out.episodes[1].steps[3].prompt_ids, groups[i].episodes[1].steps[3].prompt_ids)
