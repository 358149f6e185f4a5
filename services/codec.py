"""The one serializer of :class:`~services.contracts.GroupRecord` (issue 3).

A finished episode group travels rollout worker -> Redis -> learner as one
record. Redis is a network boundary, so records are encoded with
msgpack (never pickle) and token/log-prob arrays as little-endian bytes; large
payloads are zstd-compressed. Encoding and decoding run the same validation
(:func:`validate_group`) and raise :class:`RecordError` with the offending
field; the buffer sends records that fail to decode to the dead-letter stream.

Wire format: ``MAGIC(4) | flags(1) | payload`` where flags bit 0 = zstd. The
(decompressed) payload is ``u32 LE n | msgpack head (n bytes) | zero pad to a
multiple of 4 | p | q | lp``: the head is a map with ``"v": SCHEMA_VERSION``
and everything but the three large columns (all prompt ids, all response ids,
all log-probs of the group, steps in episode order), whose byte lengths it
lists as ``steps.cb``. The steps' scalar, text and dict fields are per-step
columns in the head.

Schema 4 (issue 3) moves the three large columns out of the msgpack map:
msgpack copies every bin into a new bytes object on unpack (~0.9 MB per
realistic group) and packing them needed a join; now the encoder casts the ids
straight into a reused per-thread buffer and the decoder reads them in place.
Together with reused memory (``services.wire_memory``) this removed most of the
~800 page faults per encode and ~400 per decode that fresh multi-MB buffers
cost. Schema 3 records are refused with an error naming the version (draining
them needs the old build); decoding them too would keep a second parser for a
one-off migration.

Schema 3 (kept in 4) departed from schema 2 in two ways,
each measured on the realistic group (8 episodes x 50 steps x 1k-token
prompts, `proxmo bench buffer`):

- Token ids are stored as uint16 when every id of the group is < 65536
  (``"tw": 2``; vocabularies up to 64k, such as Llama-2's 32k), else int32
  (``"tw": 4``, e.g. Qwen's 151k). Halving the bytes halves every copy and the
  compressor's input: 1.59 MB -> 0.79 MB of prompt ids.
- zstd runs at a fast negative level (:data:`ZSTD_LEVEL`). Prompts of one
  trajectory share long runs (system prompt, task, history), and zstd's match
  finder skips over long matches cheaply, so level -1 compresses the uint16
  prompts 7x in ~0.3 ms, where level 1 took ~0.7 ms for the same size.

Not adopted, with the measurement: storing each prompt as a delta against the
previous prompt of its trajectory (kept prefix length + new tail). Finding the
common prefix of 400 prompts cost ~1.1 ms per group in numpy (one comparison
per step) and rebuilding them ~0.5 ms, more than the whole zstd pass it was
meant to save (the compressor already finds those repeats), for a record only
~4% smaller (166 KB vs 172 KB: the tails still repeat the recent history).
Rechecked for schema 4: rebuilding 400 prompts is ~1 us of Python per step
either way, and prompts rendered by ``build_messages`` share only the system +
task text (~100 tokens) before the step counter differs, far less than the
synthetic group's 60%, so a prefix delta would save less on real data.

Encoding gathers the fields of all steps with one ``attrgetter`` pass and
concatenates the arrays in C; a group that was decoded and not touched since
is encoded from its columns, with no per-step work. Decoding returns lazy
episodes (see :mod:`services.contracts`): it validates the columns
vectorised and builds no :class:`StepRecord`; :func:`steps_from_columns`
builds them, without re-running ``__post_init__`` (their arrays are views of
the decoded int32/float32 buffers, already checked column-wise), when an
episode's ``steps`` is first read.
"""

from __future__ import annotations

import math
import operator
import struct
import threading
from typing import Any

import msgpack
import numpy as np
import zstandard

from services.contracts import (
    MAGIC,
    SCHEMA_VERSION,
    EpisodeRecord,
    GroupRecord,
    RecordError,
    StepColumns,
    StepRecord,
    _token_array,
)
from services.wire_memory import RecycledBlocks, scratch

_FLAG_ZSTD = 1
ZSTD_LEVEL = -1  # see the module docstring; negative levels trade a little size for speed

# --------------------------------------------------------------------------- columns

_STEP_FIELDS = operator.attrgetter(
    "observation", "action", "info", "reward", "valid", "done", "policy_version",
    "prompt_ids", "response_ids", "logprobs",
)


def _flat(arrays: tuple[Any, ...], name: str, reuse: str = "") -> np.ndarray:
    """All steps' ids (int32) or log-probs (float32) in one array.

    With ``reuse`` the int32 ids go into this thread's scratch buffer of that name
    (the caller must not keep the result); fields reassigned after construction
    skipped ``__post_init__`` and take the checked path.
    """
    if name == "logprobs" and not arrays:
        return np.zeros(0, np.float32)
    if reuse and arrays:
        n = sum(map(len, arrays))
        try:  # casting="no": any piece that is not int32 (int64, list, float...) takes the checked path
            return np.concatenate(arrays, out=scratch(reuse, 4 * n)[:4 * n].view(np.int32), casting="no")
        except (TypeError, ValueError):
            pass
    try:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    except ValueError as exc:  # a 0-d or 2-D array assigned after construction
        raise RecordError(f"{name}: {exc}") from exc
    if name != "logprobs":
        return _token_array(flat, name)
    if flat.ndim != 1 or flat.dtype.kind not in "iuf":
        raise RecordError(f"logprobs must be 1-D numbers, got {flat.dtype} of shape {flat.shape}")
    return flat.astype(np.float32, copy=False)


def _numbers(vals: tuple[Any, ...], kinds: str, dtype: type, name: str, ep_steps: np.ndarray) -> np.ndarray:
    """One scalar column; refuses values that a cast would silently truncate or wrap."""
    if not vals:
        return np.zeros(0, dtype)
    try:
        arr = np.asarray(vals)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{name}: {exc}") from exc
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        bad = next((i for i, v in enumerate(vals) if np.asarray(v).dtype.kind not in kinds), 0)
        what = "an integer" if "f" not in kinds else "a number"
        raise RecordError(f"{_where(ep_steps, bad)}.{name}: expected {what}, got {vals[bad]!r}")
    return arr.astype(dtype, copy=False)


def _check_types(vals: Any, typ: type, key: str, ep_steps: np.ndarray) -> None:
    """Every value of a text/dict column has the right type (one C pass in the usual case)."""
    if set(map(type, vals)) <= {typ}:
        return
    for i, v in enumerate(vals):
        if not isinstance(v, typ):
            raise RecordError(f"{_where(ep_steps, i)}.{key}: expected {typ.__name__}, got {type(v).__name__}")


def _gather(g: GroupRecord, reuse: bool = False) -> StepColumns:
    """The group's StepRecords as columns; with ``reuse`` the prompt ids live in a per-thread scratch
    buffer (encode only). Checks types and lengths step by step; :func:`_check_columns` does the rest."""
    steps = [s for e in g.episodes for s in e.steps]
    n = len(steps)
    ep_steps = np.fromiter(map(len, (e.steps for e in g.episodes)), np.int64, len(g.episodes))
    fields = tuple(zip(*map(_STEP_FIELDS, steps), strict=True)) if n else ((),) * 10
    obs, act, info, rew, valid, done, pv, prompts, responses, logprobs = fields
    for vals, typ, key in ((obs, str, "observation"), (act, str, "action"), (info, dict, "info")):
        _check_types(vals, typ, key, ep_steps)
    q_len = np.fromiter(map(len, responses), np.int64, n)
    lp_len = np.fromiter(map(len, logprobs), np.int64, n)
    bad = np.flatnonzero(lp_len != q_len)
    if bad.size:
        k = int(bad[0])
        raise RecordError(f"{_where(ep_steps, k)}: {lp_len[k]} log-probs for {q_len[k]} response tokens")
    return StepColumns(
        ep_steps=ep_steps, obs=list(obs), act=list(act), info=list(info),
        reward=_numbers(rew, "biuf", np.float64, "reward", ep_steps),
        valid=np.fromiter(map(bool, valid), np.bool_, n).view(np.uint8),
        done=np.fromiter(map(bool, done), np.bool_, n).view(np.uint8),
        pv=_numbers(pv, "iu", np.int64, "policy_version", ep_steps),
        p_len=np.fromiter(map(len, prompts), np.int64, n), q_len=q_len,
        p=_flat(prompts, "prompt_ids", "p" if reuse else ""), q=_flat(responses, "response_ids"), lp=_flat(logprobs, "logprobs"),
    )


def columns_of(g: GroupRecord, reuse: bool = False) -> StepColumns:
    """Validated columns of ``g``: its decoded ones while they still describe it exactly (no
    per-step work), else gathered from its steps (``reuse``: see :func:`_gather`)."""
    c = g.decoded_columns()
    if c is not None:
        _check_structure(c)
    else:
        c = _gather(g, reuse)
    _check_columns(c)
    return c


_DTYPES = (("reward", np.float64), ("valid", np.uint8), ("done", np.uint8), ("pv", np.int64),
           ("p_len", np.int64), ("q_len", np.int64), ("p", np.int32), ("q", np.int32), ("lp", np.float32))


def _check_structure(c: StepColumns, w: str = "steps") -> None:
    """Dtypes, types and lengths of columns that ``_gather`` did not build (decoded ones, which the
    caller may have edited since decode_group checked them); ``_gather`` gets these right by construction."""
    for key, want in _DTYPES:
        col = getattr(c, key)
        if not isinstance(col, np.ndarray) or col.dtype != want or col.ndim != 1:
            raise RecordError(f"{w}.{key}: expected a 1-D {np.dtype(want).name} array")
    n = int(c.ep_steps.sum())
    for key, col in (("o", c.obs), ("a", c.act), ("i", c.info), ("r", c.reward), ("ok", c.valid),
                     ("d", c.done), ("pv", c.pv), ("pl", c.p_len), ("ql", c.q_len)):
        if len(col) != n:
            raise RecordError(f"{w}.{key}: {len(col)} values for {n} steps")
    for key, col, typ in (("o", c.obs, str), ("a", c.act, str), ("i", c.info, dict)):
        _check_types(col, typ, key, c.ep_steps)
    for key, col in (("ok", c.valid), ("d", c.done)):
        if col.size and int(col.max()) > 1:
            raise RecordError(f"{w}.{key}: booleans must be 0 or 1")
    for key, lens, arr in (("prompt_ids", c.p_len, c.p), ("response_ids", c.q_len, c.q), ("logprobs", c.q_len, c.lp)):
        if lens.size and int(lens.min()) < 0:
            raise RecordError(f"{w}.{key}: negative length")
        if int(lens.sum()) != len(arr):
            raise RecordError(f"{w}.{key}: lengths add up to {int(lens.sum())}, buffer holds {len(arr)}")


def _where(ep_steps: np.ndarray, flat: int) -> str:
    """``episodes[e].steps[s]`` for the flat step index ``flat``."""
    ends = np.cumsum(ep_steps)
    e = int(np.searchsorted(ends, flat, side="right"))
    start = int(ends[e - 1]) if e else 0
    return f"episodes[{e}].steps[{flat - start}]"


def _check_columns(c: StepColumns, ids_from_u16: bool = False) -> int:
    """Vectorized semantic checks of all steps; names the first offending step.

    Returns the bitwise OR of all token ids (>= the largest, all being >= 0) for the token width.
    With ``ids_from_u16`` (decode of a 2-byte record) the ids were widened from uint16, so they
    are in range by construction and not scanned (a pass over ~1.6 MB per realistic group).
    """
    bad = np.flatnonzero(~np.isfinite(c.reward))
    if bad.size:
        raise RecordError(f"{_where(c.ep_steps, int(bad[0]))}.reward: not finite ({c.reward[bad[0]]})")
    if c.lp.size and not np.isfinite(c.lp).all():
        tok = int(np.flatnonzero(~np.isfinite(c.lp))[0])
        step = int(np.searchsorted(np.cumsum(c.q_len), tok, side="right"))
        raise RecordError(f"{_where(c.ep_steps, step)}.logprobs: not all finite")
    top = 0
    for name, ids, lens in (("prompt_ids", c.p, c.p_len), ("response_ids", c.q, c.q_len)):
        if int(lens.sum()) != len(ids):
            raise RecordError(f"{name}: step lengths add up to {int(lens.sum())}, the ids hold {len(ids)}")
        if ids_from_u16:
            continue
        bits = int(np.bitwise_or.reduce(ids)) if ids.size else 0
        top |= bits
        if bits < 0:  # the sign bit survives an OR
            tok = int(np.flatnonzero(ids < 0)[0])
            step = int(np.searchsorted(np.cumsum(lens), tok, side="right"))
            raise RecordError(f"{_where(c.ep_steps, step)}.{name}: negative token id")
    if c.pv.size and int(c.pv.min()) < 0:
        step = int(np.flatnonzero(c.pv < 0)[0])
        raise RecordError(f"{_where(c.ep_steps, step)}: negative policy_version {c.pv[step]}")
    return top


def validate_group(g: GroupRecord) -> None:
    """Semantic checks shared by encode (fail at the producer) and decode (fail before the learner).

    Raises RecordError naming the first offending field.
    """
    _check_group_fields(g)
    columns_of(g)


def _check_group_fields(g: GroupRecord) -> None:
    if not g.episodes:
        raise RecordError(f"group {g.group_id}: has no episodes")
    if not g.group_id:
        raise RecordError("group_id is empty (it is the idempotence key)")
    if g.policy_version < 0:
        raise RecordError(f"group {g.group_id}: negative policy_version {g.policy_version}")
    _finite(g.created_at, "group.created_at")
    _finite(g.finished_at, "group.finished_at")
    for ei, e in enumerate(g.episodes):
        _finite(e.score, f"episodes[{ei}].score")


# --------------------------------------------------------------------------- encode

_local = threading.local()  # zstd contexts are not thread-safe; one per thread
_ID_BLOCKS = RecycledBlocks()  # memory of decoded prompt ids, reused once the learner drops them
_U16_LIMIT = 1 << 16
_HEAD = struct.Struct("<I")  # byte length of the msgpack head
_AT = 8  # payload offset in the encode scratch buffer (aligned); MAGIC and flags go just before it


def _zstd_c() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.c


def _zstd_d() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "d"):
        _local.d = zstandard.ZstdDecompressor()
    return _local.d


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _payload(head: dict[str, Any], columns: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, int]:
    """The payload ``u32 len(head) | msgpack head | zero pad to 4 | columns`` at ``_AT`` of a scratch buffer.

    The columns are cast (int32 ids -> uint16 when they fit) straight into place,
    never through intermediate bytes objects. Returns the buffer and the payload end.
    """
    try:
        packed = msgpack.packb(head, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # non-serializable info value, int overflow...
        raise RecordError(f"cannot encode group {head.get('gid')}: {exc}") from exc
    if len(packed) >= 1 << 32:
        raise RecordError(f"group {head.get('gid')}: header of {len(packed)} bytes is too large")
    pos = _AT + _align4(_HEAD.size + len(packed))
    end = pos + sum(head["steps"]["cb"])
    buf = scratch("wire", end)
    _HEAD.pack_into(buf, _AT, len(packed))
    buf[_AT + _HEAD.size:_AT + _HEAD.size + len(packed)] = np.frombuffer(packed, np.uint8)
    buf[_AT + _HEAD.size + len(packed):pos] = 0
    for (arr, dtype), nb in zip(columns, head["steps"]["cb"], strict=True):
        np.copyto(buf[pos:pos + nb].view(dtype), arr, casting="unsafe")  # ranges were checked (_check_columns)
        pos += nb
    return buf, end


def encode_group(g: GroupRecord, compress_min_bytes: int = 4096) -> bytes:
    """Validate and serialize; raises RecordError rather than write a record the learner would reject."""
    _check_group_fields(g)
    c = g.decoded_columns()  # an untouched decoded group: its columns, no per-step work
    if c is not None:
        _check_structure(c)
    else:
        c = _gather(g, reuse=True)
    # ids are >= 0 (checked), so their OR bounds the largest: 2 bytes each when it fits in uint16
    tw = 2 if _check_columns(c) < _U16_LIMIT else 4
    tok = "<u2" if tw == 2 else "<i4"
    head = {
        "v": SCHEMA_VERSION,
        "task_id": g.task_id,
        "env": g.env_name,
        "task_type": g.task_type,
        "worker": g.worker_id,
        "pv": int(g.policy_version),
        "gid": g.group_id,
        "t0": float(g.created_at),
        "t1": float(g.finished_at),
        "eps": [
            {"won": bool(e.won), "score": float(e.score), "tt": e.task_type,
             "infra": bool(e.infra_failure), "why": e.failure_reason, "n": e.num_steps}
            for e in g.episodes
        ],
        "steps": {
            "o": c.obs, "a": c.act, "i": c.info,
            "r": c.reward.astype("<f8", copy=False).tobytes(),
            "ok": c.valid.tobytes(),
            "d": c.done.tobytes(),
            "pv": c.pv.astype("<i8", copy=False).tobytes(),
            "pl": c.p_len.astype("<i8", copy=False).tobytes(),
            "ql": c.q_len.astype("<i8", copy=False).tobytes(),
            "tw": tw,
            "cb": [c.p.size * tw, c.q.size * tw, c.lp.size * 4],  # column byte lengths, in this order
        },
    }
    buf, end = _payload(head, [(c.p, tok), (c.q, tok), (c.lp, "<f4")])
    payload = memoryview(buf)[_AT:end]
    if len(payload) >= compress_min_bytes:
        packed = _zstd_c().compress(payload)
        if len(packed) < len(payload):
            return b"".join([MAGIC, bytes([_FLAG_ZSTD]), packed])
    buf[_AT - 5:_AT - 1] = np.frombuffer(MAGIC, np.uint8)
    buf[_AT - 1] = 0
    return buf[_AT - 5:end].tobytes()


# --------------------------------------------------------------------------- decode


def _need(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise RecordError(f"{where}: missing field {key!r}")
    val = d[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(val, allowed) or (isinstance(val, bool) and bool not in allowed):
        raise RecordError(f"{where}.{key}: expected {'/'.join(t.__name__ for t in allowed)}, got {type(val).__name__}")
    return val


def _array(buf: bytes | memoryview, dtype: str, n: int | None, where: str, out: type | None = None) -> np.ndarray:
    """A wire column as a writable native array of ``out`` (default: ``dtype`` in native order)."""
    size = np.dtype(dtype).itemsize
    if len(buf) % size:
        raise RecordError(f"{where}: byte length {len(buf)} is not a multiple of {size}")
    arr = np.frombuffer(buf, dtype=dtype)
    if n is not None and len(arr) != n:
        raise RecordError(f"{where}: {len(arr)} values for {n} steps")
    return arr.astype(out or dtype[1:], copy=True)


def _ids(buf: memoryview, dtype: str, where: str) -> np.ndarray:
    """Token ids as writable int32 in a recycled block (see ``services.wire_memory``)."""
    size = np.dtype(dtype).itemsize
    if len(buf) % size:
        raise RecordError(f"{where}: byte length {len(buf)} is not a multiple of {size}")
    wire = np.frombuffer(buf, dtype=dtype)
    out = _ID_BLOCKS.take(4 * len(wire)).view(np.int32)
    np.copyto(out, wire, casting="safe")
    return out


def _finite(x: float, where: str) -> float:
    if not math.isfinite(x):
        raise RecordError(f"{where}: not finite ({x})")
    return float(x)


def _decompress(payload: memoryview, size: int, max_bytes: int) -> memoryview:
    """The decompressed payload; with a stated size, into this thread's scratch buffer (it never
    leaves decode_group: the columns are copied out and the head is parsed into new objects)."""
    try:
        if size < 0:  # no content size in the frame header (not written by encode_group)
            return memoryview(_zstd_d().decompress(payload, max_output_size=max_bytes))
        out = memoryview(scratch("decode", size + 1))[:size + 1]
        reader = _zstd_d().stream_reader(payload, read_size=len(payload))
        n = 0
        while n <= size:  # one byte of room past the stated size detects a frame that lies about it
            got = reader.readinto(out[n:])
            if not got:
                break
            n += got
    except zstandard.ZstdError as exc:
        raise RecordError(f"corrupt or over-limit compressed record: {exc}") from exc
    if n != size:
        raise RecordError(f"corrupt compressed record: {n} bytes decompressed, the frame states {size}")
    return out[:size]


def _unpack(data: bytes, max_bytes: int) -> tuple[dict[str, Any], list[memoryview]]:
    """The checked head and views of the three columns (prompt ids, response ids, log-probs)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"record must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise RecordError(f"record of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 5 or data[:4] != MAGIC:
        raise RecordError("not a ProxMO group record (bad magic)")
    flags, payload = data[4], memoryview(data)[5:]
    if flags & ~_FLAG_ZSTD:
        raise RecordError(f"unknown flags {flags:#x}")
    if flags & _FLAG_ZSTD:
        # max_output_size is ignored when the frame header states a content size, so
        # check that size first: a forged header must not make us allocate gigabytes.
        try:
            size = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise RecordError(f"corrupt compressed record: {exc}") from exc
        if size > max_bytes:
            raise RecordError(f"compressed record expands to {size} bytes, over the limit of {max_bytes}")
        payload = _decompress(payload, size, max_bytes)
    if len(payload) < _HEAD.size:
        raise RecordError(f"truncated or corrupt record: {len(payload)} payload bytes")
    (n_head,) = _HEAD.unpack_from(payload)
    start = _align4(_HEAD.size + n_head)
    if start > len(payload):
        raise RecordError(f"truncated or corrupt record: header of {n_head} bytes in a payload of {len(payload)}")
    try:
        body = msgpack.unpackb(payload[_HEAD.size:_HEAD.size + n_head], raw=False, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"truncated or corrupt msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise RecordError("record body is not a map")
    version = body.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        old = " (written before the column layout of issue 3; drain the buffer with the old build)" if version == 3 else ""
        raise RecordError(f"unsupported schema version {version!r} (this build reads {SCHEMA_VERSION}){old}")
    st = _need(body, "steps", dict, "group")
    cb = _need(st, "cb", list, "steps")
    if len(cb) != 3 or not all(type(n) is int and n >= 0 for n in cb):
        raise RecordError(f"steps.cb: expected 3 column byte lengths, got {cb!r}")
    if start + sum(cb) != len(payload):
        raise RecordError(f"truncated or padded record: columns of {sum(cb)} bytes declared, "
                          f"{len(payload) - start} present")
    ends = np.cumsum([start, *cb]).tolist()
    return body, [payload[a:b] for a, b in zip(ends, ends[1:])]


def _decode_columns(body: dict[str, Any], cols: list[memoryview], ep_steps: np.ndarray) -> StepColumns:
    st = body["steps"]
    n = int(ep_steps.sum())
    w = "steps"

    tw = _need(st, "tw", int, w)
    if tw not in (2, 4):
        raise RecordError(f"{w}.tw: token width must be 2 or 4 bytes, got {tw}")
    tok = "<u2" if tw == 2 else "<i4"
    c = StepColumns(
        ep_steps=ep_steps,
        obs=_need(st, "o", list, w), act=_need(st, "a", list, w), info=_need(st, "i", list, w),  # checked below
        reward=_array(_need(st, "r", bytes, w), "<f8", n, f"{w}.r"),
        valid=_array(_need(st, "ok", bytes, w), "|u1", n, f"{w}.ok"),
        done=_array(_need(st, "d", bytes, w), "|u1", n, f"{w}.d"),
        pv=_array(_need(st, "pv", bytes, w), "<i8", n, f"{w}.pv"),
        p_len=_array(_need(st, "pl", bytes, w), "<i8", n, f"{w}.pl"),
        q_len=_array(_need(st, "ql", bytes, w), "<i8", n, f"{w}.ql"),
        p=_ids(cols[0], tok, f"{w}.prompt_ids"),
        q=_array(cols[1], tok, None, f"{w}.response_ids", np.int32),
        lp=_array(cols[2], "<f4", None, f"{w}.logprobs"),
    )
    _check_structure(c, w)
    _check_columns(c, ids_from_u16=tw == 2)
    return c


def steps_from_columns(c: StepColumns, start: int, stop: int) -> list[StepRecord]:
    """StepRecords of steps ``start:stop`` straight from checked columns, skipping ``__post_init__``
    (~1 us instead of ~9 us each); their arrays are views of the columns."""
    new, cls = object.__new__, StepRecord
    po, qo = c.p_off[start:stop + 1].tolist(), c.q_off[start:stop + 1].tolist()
    p, q, lp = c.p, c.q, c.lp
    out = []
    for k, (o, a, r, ok, d, pv, info) in enumerate(zip(
        c.obs[start:stop], c.act[start:stop], c.reward[start:stop].tolist(), (c.valid[start:stop] != 0).tolist(),
        (c.done[start:stop] != 0).tolist(), c.pv[start:stop].tolist(), c.info[start:stop], strict=True,
    )):
        s = new(cls)
        s.__dict__ = {"observation": o, "action": a, "reward": r, "valid": ok, "done": d,
                      "prompt_ids": p[po[k]:po[k + 1]], "response_ids": q[qo[k]:qo[k + 1]],
                      "logprobs": lp[qo[k]:qo[k + 1]], "policy_version": pv, "info": info}
        out.append(s)
    return out


def _episode_fields(e: dict[str, Any], ei: int) -> dict[str, Any]:
    """The checked scalar fields of wire episode ``ei``; the usual case costs one type test per field."""
    won, score, tt, infra, why = (e.get(k) for k in ("won", "score", "tt", "infra", "why"))
    if (type(won) is bool and type(infra) is bool and type(tt) is str and type(why) is str
            and (type(score) is float or type(score) is int) and math.isfinite(score)):
        return {"won": won, "score": float(score), "task_type": tt, "infra_failure": infra, "failure_reason": why}
    where = f"episodes[{ei}]"  # something is off: find it and say what, field by field
    return {
        "won": _need(e, "won", bool, where),
        "score": _finite(_need(e, "score", (int, float), where), f"{where}.score"),
        "task_type": _need(e, "tt", str, where),
        "infra_failure": _need(e, "infra", bool, where),
        "failure_reason": _need(e, "why", str, where),
    }


def decode_group(data: bytes, max_bytes: int = 64 * 1024 * 1024) -> GroupRecord:
    """Decode and validate; raises RecordError on anything unexpected.

    The episodes are lazy: their StepRecords are built when ``steps`` is first read;
    ``group.step_columns()`` gives the numbers without building them.
    """
    body, cols = _unpack(data, max_bytes)
    eps_wire = _need(body, "eps", list, "group")
    if not eps_wire:
        raise RecordError("group has no episodes")
    for ei, e in enumerate(eps_wire):
        if not isinstance(e, dict):
            raise RecordError(f"episodes[{ei}]: not a map")
        n = _need(e, "n", int, f"episodes[{ei}]")
        if n < 0:
            raise RecordError(f"episodes[{ei}].n: negative step count")
    ep_steps = np.array([e["n"] for e in eps_wire], np.int64)
    c = _decode_columns(body, cols, ep_steps)
    episodes = []
    k = 0
    for ei, e in enumerate(eps_wire):
        # steps are built on first access (services.contracts)
        episodes.append(EpisodeRecord._lazy(c, k, k + e["n"], **_episode_fields(e, ei)))
        k += e["n"]
    group = GroupRecord(
        task_id=_need(body, "task_id", str, "group"),
        episodes=episodes,
        env_name=_need(body, "env", str, "group"),
        task_type=_need(body, "task_type", str, "group"),
        worker_id=_need(body, "worker", str, "group"),
        policy_version=_need(body, "pv", int, "group"),
        group_id=_need(body, "gid", str, "group"),
        created_at=_need(body, "t0", (int, float), "group"),
        finished_at=_need(body, "t1", (int, float), "group"),
        schema_version=body["v"],
    )
    _check_group_fields(group)
    return group
