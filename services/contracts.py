"""Typed contracts for every hop between services, and their one serializer.

A finished episode group travels rollout worker -> Redis -> learner as one
:class:`GroupRecord`. Redis is a network boundary, so records are encoded with
msgpack (never pickle) and token/log-prob arrays as little-endian int32/float32
bytes; large payloads are zstd-compressed. Decoding validates the schema and
raises :class:`RecordError` with a reason; the buffer sends such records to the
dead-letter stream.

Wire format: ``MAGIC(4) | flags(1) | body`` where flags bit 0 = zstd; body is a
msgpack map with ``"v": SCHEMA_VERSION``.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zstandard

SCHEMA_VERSION = 1
MAGIC = b"PXG1"
_FLAG_ZSTD = 1
_ZSTD_LEVEL = 3


class RecordError(ValueError):
    """A record cannot be decoded or fails schema validation."""


@dataclass
class StepRecord:
    """One agent turn: the prompt the policy saw, what it sampled, what the env returned."""

    observation: str  # anchor state for step grouping (raw env observation before the action)
    action: str  # parsed action ("" when invalid)
    reward: float
    valid: bool  # the model output parsed into an action
    done: bool
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    response_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # per response token
    policy_version: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able extras (admissible count, score...)

    def __post_init__(self) -> None:
        self.prompt_ids = _token_array(self.prompt_ids, "prompt_ids")
        self.response_ids = _token_array(self.response_ids, "response_ids")
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.logprobs.ndim != 1:
            raise RecordError(f"logprobs must be 1-D, got shape {self.logprobs.shape}")


_I32_MAX = 2**31 - 1


def _token_array(x: Any, name: str) -> np.ndarray:
    """Token ids as 1-D int32; refuses values that a silent int32 cast would wrap."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise RecordError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int32)
    if a.dtype.kind not in "iu":
        raise RecordError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.dtype != np.int32 and (int(a.min()) < 0 or int(a.max()) > _I32_MAX):
        raise RecordError(f"{name} holds ids outside 0..{_I32_MAX}")
    return a.astype(np.int32, copy=False)


@dataclass
class EpisodeRecord:
    steps: list[StepRecord]
    won: bool = False
    score: float = 0.0  # environment score (e.g. WebShop's 0..1), separate from success
    task_type: str = ""
    infra_failure: bool = False  # env crashed / hung: masked out of group statistics
    failure_reason: str = ""

    @property
    def total_reward(self) -> float:
        return float(sum(s.reward for s in self.steps))


@dataclass
class GroupRecord:
    """All G episodes of one task (same task id, same seed)."""

    task_id: str
    episodes: list[EpisodeRecord]
    env_name: str = ""
    task_type: str = ""
    worker_id: str = ""
    policy_version: int = 0  # oldest policy version that produced any step of the group
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # idempotence key
    created_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def num_steps(self) -> int:
        return sum(len(e.steps) for e in self.episodes)


# --------------------------------------------------------------------------- validation


def validate_group(g: GroupRecord) -> None:
    """Semantic checks shared by encode (fail at the producer) and decode (fail before the learner).

    Raises RecordError naming the first offending field.
    """
    if not g.episodes:
        raise RecordError(f"group {g.group_id}: has no episodes")
    if not g.group_id:
        raise RecordError("group_id is empty (it is the idempotence key)")
    if g.policy_version < 0:
        raise RecordError(f"group {g.group_id}: negative policy_version {g.policy_version}")
    _finite(g.created_at, "group.created_at")
    _finite(g.finished_at, "group.finished_at")
    for ei, e in enumerate(g.episodes):
        where = f"episodes[{ei}]"
        _finite(e.score, f"{where}.score")
        for si, s in enumerate(e.steps):
            sw = f"{where}.steps[{si}]"
            _finite(s.reward, f"{sw}.reward")
            if len(s.logprobs) != len(s.response_ids):
                raise RecordError(f"{sw}: {len(s.logprobs)} log-probs for {len(s.response_ids)} response tokens")
            if s.logprobs.size and not np.isfinite(s.logprobs).all():
                raise RecordError(f"{sw}.logprobs: not all finite")
            for name in ("prompt_ids", "response_ids"):
                ids = getattr(s, name)
                if ids.size and int(ids.min()) < 0:
                    raise RecordError(f"{sw}.{name}: negative token id")
            if s.policy_version < 0:
                raise RecordError(f"{sw}: negative policy_version {s.policy_version}")


# --------------------------------------------------------------------------- encode


def _step_to_wire(s: StepRecord) -> dict[str, Any]:
    return {
        "o": s.observation,
        "a": s.action,
        "r": float(s.reward),
        "ok": bool(s.valid),
        "d": bool(s.done),
        "p": np.ascontiguousarray(s.prompt_ids, "<i4").tobytes(),
        "q": np.ascontiguousarray(s.response_ids, "<i4").tobytes(),
        "lp": np.ascontiguousarray(s.logprobs, "<f4").tobytes(),
        "pv": int(s.policy_version),
        "i": s.info,
    }


def encode_group(g: GroupRecord, compress_min_bytes: int = 4096) -> bytes:
    """Validate and serialize; raises RecordError rather than write a record the learner would reject."""
    validate_group(g)
    body = {
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
            {
                "won": bool(e.won),
                "score": float(e.score),
                "tt": e.task_type,
                "infra": bool(e.infra_failure),
                "why": e.failure_reason,
                "steps": [_step_to_wire(s) for s in e.steps],
            }
            for e in g.episodes
        ],
    }
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError) as exc:  # non-serializable info value, int overflow...
        raise RecordError(f"cannot encode group {g.group_id}: {exc}") from exc
    if len(raw) >= compress_min_bytes:
        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
        if len(packed) < len(raw):
            return MAGIC + bytes([_FLAG_ZSTD]) + packed
    return MAGIC + bytes([0]) + raw


# --------------------------------------------------------------------------- decode


def _need(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise RecordError(f"{where}: missing field {key!r}")
    val = d[key]
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise RecordError(f"{where}.{key}: expected {types}, got {type(val).__name__}")
    return val


def _array(buf: bytes, dtype: str, where: str) -> np.ndarray:
    if len(buf) % 4:
        raise RecordError(f"{where}: byte length {len(buf)} is not a multiple of 4")
    return np.frombuffer(buf, dtype=dtype).copy()


def _finite(x: float, where: str) -> float:
    if not math.isfinite(x):
        raise RecordError(f"{where}: not finite ({x})")
    return float(x)


def decode_group(data: bytes, max_bytes: int = 64 * 1024 * 1024) -> GroupRecord:
    """Decode and validate; raises RecordError on anything unexpected."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"record must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise RecordError(f"record of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 5 or data[:4] != MAGIC:
        raise RecordError("not a ProxMO group record (bad magic)")
    flags, payload = data[4], data[5:]
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
        try:
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_bytes)
        except zstandard.ZstdError as exc:
            raise RecordError(f"corrupt or over-limit compressed record: {exc}") from exc
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"truncated or corrupt msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise RecordError("record body is not a map")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise RecordError(f"unsupported schema version {version!r} (this build reads {SCHEMA_VERSION})")
    episodes = []
    for ei, e in enumerate(_need(body, "eps", list, "group")):
        where = f"episodes[{ei}]"
        if not isinstance(e, dict):
            raise RecordError(f"{where}: not a map")
        steps = []
        for si, s in enumerate(_need(e, "steps", list, where)):
            sw = f"{where}.steps[{si}]"
            if not isinstance(s, dict):
                raise RecordError(f"{sw}: not a map")
            resp = _array(_need(s, "q", bytes, sw), "<i4", f"{sw}.response_ids")
            lps = _array(_need(s, "lp", bytes, sw), "<f4", f"{sw}.logprobs")
            if len(lps) != len(resp):
                raise RecordError(f"{sw}: {len(lps)} log-probs for {len(resp)} response tokens")
            steps.append(
                StepRecord(
                    observation=_need(s, "o", str, sw),
                    action=_need(s, "a", str, sw),
                    reward=_finite(_need(s, "r", (int, float), sw), f"{sw}.reward"),
                    valid=_need(s, "ok", bool, sw),
                    done=_need(s, "d", bool, sw),
                    prompt_ids=_array(_need(s, "p", bytes, sw), "<i4", f"{sw}.prompt_ids"),
                    response_ids=resp,
                    logprobs=lps,
                    policy_version=_need(s, "pv", int, sw),
                    info=_need(s, "i", dict, sw),
                )
            )
        episodes.append(
            EpisodeRecord(
                steps=steps,
                won=_need(e, "won", bool, where),
                score=_finite(_need(e, "score", (int, float), where), f"{where}.score"),
                task_type=_need(e, "tt", str, where),
                infra_failure=_need(e, "infra", bool, where),
                failure_reason=_need(e, "why", str, where),
            )
        )
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
        schema_version=version,
    )
    validate_group(group)
    return group
