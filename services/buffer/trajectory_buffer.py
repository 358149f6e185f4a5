"""The trajectory buffer: episode groups on a Redis Stream, read through a consumer group.

Why this shape (issue 3): rollout workers and the learner must survive each
other's crashes without losing or double counting a group. Producers XADD one
entry per group; the learner reads through a consumer group and acks an entry
only after the update that used it is checkpointed, so a learner crash leaves
the entry pending and a restarted (or other) consumer gets it again.

Entry layout: ``gid`` (group id), ``pv`` (policy version) and ``d`` (the
:func:`services.codec.encode_group` bytes). Settled entries (acked, dead
or dropped as stale) are deleted from the stream, so Redis memory is bounded
by ``max_depth`` plus what the learner holds. Each push also leaves one tiny
entry in ``<stream>:tick`` (trimmed to the newest), which an idle reader
blocks on instead of on the stream, whose new entry it would be sent whole.

Counters (hash ``<stream>:stats``), each changed by a Lua script in the same
atomic step as the stream operation it counts (see ``scripts.py``):

- ``produced``: distinct group ids added. A re-push of a known group id (a
  producer retrying after a connection error) adds nothing and counts
  ``duplicates`` instead.
- ``consumed``: first deliveries (XREADGROUP ``>``). ``redelivered``: later
  deliveries (own pending list after a restart, or reclaimed from a consumer
  idle longer than ``claim_idle_ms``); informative only.
- ``acked`` / ``dead`` / ``dropped_stale``: entries settled each way; an
  entry is settled at most once (only a successful XACK counts).
  ``dead_foreign``: dead-lettered entries that push never produced (garbage
  written to the stream directly; also an entry deleted while pending).

Invariant, checked by the tests: ``produced == acked + dead + dropped_stale +
depth + pending`` at every quiet moment (with no entries written around
``push``), where

- ``pending`` = delivered but not yet settled (XPENDING count), and
- ``depth`` = produced and never delivered = XLEN - pending.

Backpressure uses ``depth``: a producer waits while ``depth >= max_depth``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from services.buffer import scripts
from services.buffer.errors import BackpressureTimeout, RedisUnavailableError, redact_url
from services.buffer.redis_server import connect_redis
from services.codec import decode_group, encode_group
from services.config import BufferConfig
from services.contracts import GroupRecord, RecordError

log = logging.getLogger(__name__)

T = TypeVar("T")

COUNTERS = ("produced", "consumed", "redelivered", "acked", "dead", "dead_foreign", "dropped_stale", "duplicates")


@dataclass
class Delivery:
    """One group handed to the learner; ``msg_id`` is what it later acks."""

    msg_id: str
    group: GroupRecord
    redelivered: bool = False  # delivered before (crashed consumer, or own restart)
    nbytes: int = 0  # encoded size on the wire


def _s(x: Any) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


class TrajectoryBuffer:
    """Producer and consumer side of the buffer; one instance per process and consumer name.

    Thread-safe: redis-py pools connections and the in-flight table is locked.
    """

    def __init__(self, cfg: BufferConfig, url: str, consumer: str = "learner-0") -> None:
        if cfg.max_depth < 1:
            raise ValueError(f"buffer.max_depth must be >= 1, got {cfg.max_depth}")
        if cfg.max_staleness < 0:
            raise ValueError(f"buffer.max_staleness must be >= 0, got {cfg.max_staleness}")
        self.cfg = cfg
        self.url = url
        self.consumer = consumer
        self.stream = cfg.stream
        self.k_stats = f"{cfg.stream}:stats"
        self.k_dead = f"{cfg.stream}:dead"
        self.k_seen = f"{cfg.stream}:seen"
        self.k_seen_t = f"{cfg.stream}:seen:t"
        self.k_tick = f"{cfg.stream}:tick"  # one tiny entry per push: what an idle reader waits on
        self._r = connect_redis(url, timeout_s=cfg.reconnect_timeout_s)
        self._push = self._r.register_script(scripts.PUSH)
        self._read = self._r.register_script(scripts.READ)
        self._settle = self._r.register_script(scripts.SETTLE)
        self._dead = self._r.register_script(scripts.DEAD)
        self._touch = self._r.register_script(scripts.TOUCH)
        self._lock = threading.Lock()
        self._inflight: dict[str, float] = {}  # msg id -> local time of delivery
        self._claim_cursor = "0-0"
        self._own_from = "0"  # first read recovers this consumer's own pending list
        self._drained_at = ""  # tick id at which the last read left nothing behind ('': not known)
        self._ensure_group()

    # ------------------------------------------------------------------ plumbing

    def _ensure_group(self) -> None:
        # Id 0 (not $): groups pushed before the learner started are not skipped.
        try:
            self._r.xgroup_create(self.stream, self.cfg.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying lost connections with backoff for ``reconnect_timeout_s``.

        Safe because every mutating call is an idempotent script (group id
        dedupe on push, XACK-guarded settle) or re-delivers through the pending
        list (read).
        """
        deadline = time.monotonic() + self.cfg.reconnect_timeout_s
        delay = 0.05
        recreated = False
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if what == "read":
                    # The reply may be lost after the server assigned entries to us: recover them.
                    self._own_from, self._drained_at = "0", ""
                if time.monotonic() + delay > deadline:
                    raise RedisUnavailableError(
                        f"buffer {what}: Redis at {redact_url(self.url)} unreachable for "
                        f"{self.cfg.reconnect_timeout_s:.0f} s: {exc}"
                    ) from exc
                log.warning("buffer %s: Redis connection lost (%s); retrying in %.2f s", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except redis.ResponseError as exc:
                # An external Redis restarted without persistence loses the group: recreate once.
                if "NOGROUP" in str(exc) and not recreated:
                    log.warning("buffer %s: consumer group %r missing; recreating it", what, self.cfg.group)
                    self._ensure_group()
                    recreated = True
                    continue
                raise

    def _depth_pending(self) -> tuple[int, int]:
        pipe = self._r.pipeline(transaction=True)
        pipe.xlen(self.stream)
        pipe.xpending(self.stream, self.cfg.group)
        length, pend = pipe.execute()
        pending = int(pend["pending"])
        return int(length) - pending, pending

    # ------------------------------------------------------------------ producer

    def push(self, group: GroupRecord) -> str:
        """Add one finished group; waits while the buffer is full. Returns the entry id.

        Raises :class:`RecordError` for a group that cannot be encoded or is
        larger than ``max_record_bytes`` (nothing is written), and
        :class:`BackpressureTimeout` after ``push_timeout_s`` without room.
        A group id pushed before returns the first entry's id and adds nothing.
        """
        payload = encode_group(group, compress_min_bytes=self.cfg.compress_min_bytes)
        if len(payload) > self.cfg.max_record_bytes:
            raise RecordError(
                f"group {group.group_id}: encoded size {len(payload)} bytes exceeds "
                f"buffer.max_record_bytes={self.cfg.max_record_bytes}"
            )
        deadline = time.monotonic() + self.cfg.push_timeout_s
        waited = False
        while True:
            now = time.time()
            args = [self.cfg.group, group.group_id, int(group.policy_version), payload,
                    self.cfg.max_depth, repr(now), repr(now - self.cfg.dedupe_window_s)]
            keys = [self.stream, self.k_stats, self.k_seen, self.k_seen_t, self.k_tick]
            status, value = self._call("push", lambda a=args, k=keys: self._push(keys=k, args=a))
            status, value = _s(status), _s(value)
            if status == "ok":
                if waited:
                    log.info("buffer %s: room again; producer resumed", self.stream)
                return value
            if status == "dup":
                log.info("buffer %s: group %s was already pushed as %s; not added again",
                         self.stream, group.group_id, value)
                return value
            if not waited:
                log.warning(
                    "buffer %s full (depth %s >= max_depth %d): producer waits up to %.1f s for the learner",
                    self.stream, value, self.cfg.max_depth, self.cfg.push_timeout_s,
                )
                waited = True
            self._wait_for_room(deadline, group.group_id)

    def _wait_for_room(self, deadline: float, gid: str) -> None:
        delay = 0.01
        while True:
            depth, _ = self._call("depth", self._depth_pending)
            if depth < self.cfg.max_depth:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackpressureTimeout(
                    f"buffer {self.stream} stayed full (depth {depth} >= max_depth {self.cfg.max_depth}) "
                    f"for push_timeout_s={self.cfg.push_timeout_s} s; group {gid} was not added. "
                    "Is the learner reading?"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)

    # ------------------------------------------------------------------ consumer

    def read(self, max_groups: int, block_ms: int = 0) -> list[Delivery]:
        """Up to ``max_groups`` decoded groups, waiting up to ``block_ms`` for the first.

        Order of sources: this consumer's own pending entries (first call after
        a restart), entries of consumers idle longer than ``claim_idle_ms``,
        then new entries. Malformed entries go to ``<stream>:dead`` with the
        reason and are never returned.

        Waiting: when the previous read got fewer entries than it asked for,
        nothing was left behind, and new entries come with a push, which adds
        a tick after the one that read saw. So a blocking read first waits for
        such a tick and then reads once: a learner that keeps up saves an empty
        read per group. The wait is capped so that entries of a dead consumer
        (claimable without any push) and entries written around push are still
        found.
        """
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        deadline = time.monotonic() + max(0, block_ms) / 1000.0
        while True:
            left = deadline - time.monotonic()
            if self._drained_at and left > 0:
                self._wait_for_tick(self._drained_at, left)
            self._touch_if_old()
            again, fresh = self._call("read", lambda: self._read_once(max_groups))
            out = self._decode_all(again, redelivered=True) + self._decode_all(fresh, redelivered=False)
            if out or time.monotonic() >= deadline:
                return out

    def _wait_for_tick(self, after: str, left: float) -> None:
        """Block until a push adds a tick after ``after`` (the tick stream, not the stream: XREAD would
        send the whole new entry), for at most ``left`` s and the periodic cap."""
        wait = min(left, max(0.05, min(1.0, self.cfg.claim_idle_ms / 2000.0)))
        self._call("wait", lambda: self._r.xread({self.k_tick: after}, count=1, block=max(1, int(wait * 1000))))

    def _read_once(self, count: int) -> tuple[list, list]:
        own_from = self._own_from
        res = self._read(
            keys=[self.stream, self.k_stats, self.k_tick],
            args=[self.cfg.group, self.consumer, count, int(self.cfg.claim_idle_ms), self._claim_cursor, own_from],
        )
        again, fresh, cursor, own_next, drained_at = res
        self._claim_cursor = _s(cursor)
        self._own_from = _s(own_next)
        self._drained_at = _s(drained_at)
        return list(again or []), list(fresh or [])

    def _decode_all(self, entries: Sequence[Any], redelivered: bool) -> list[Delivery]:
        out: list[Delivery] = []
        for entry in entries:
            msg_id = _s(entry[0])
            with self._lock:
                mine_already = msg_id in self._inflight
            if mine_already:  # our own work in progress came back through a recovery path
                continue
            raw_fields = entry[1] if len(entry) > 1 else None
            if not raw_fields:
                self._to_dead(msg_id, "entry was deleted while pending")
                continue
            fields = {_s(raw_fields[i]): raw_fields[i + 1] for i in range(0, len(raw_fields) - 1, 2)}
            payload = fields.get("d")
            if payload is None:
                self._to_dead(msg_id, f"missing field 'd' (fields: {sorted(fields)})")
                continue
            try:
                group = decode_group(payload, max_bytes=self.cfg.max_record_bytes)
            except RecordError as exc:
                self._to_dead(msg_id, f"RecordError: {exc}")
                continue
            gid = _s(fields.get("gid", b""))
            if gid != group.group_id:
                self._to_dead(msg_id, f"entry gid {gid!r} does not match the record's group_id {group.group_id!r}")
                continue
            with self._lock:
                self._inflight[msg_id] = time.monotonic()
            out.append(Delivery(msg_id, group, redelivered=redelivered, nbytes=len(payload)))
        return out

    def reject(self, msg_id: str, reason: str) -> None:
        """Settle a delivered entry this consumer will not use: moved to the dead letters with ``reason``."""
        self._to_dead(msg_id, reason)

    def _to_dead(self, msg_id: str, reason: str) -> None:
        log.warning("buffer %s: entry %s moved to %s: %s", self.stream, msg_id, self.k_dead, reason)
        self._call("dead-letter", lambda: self._dead(
            keys=[self.stream, self.k_stats, self.k_dead, self.k_seen], args=[self.cfg.group, self.consumer, msg_id, reason]))

    def _touch_if_old(self) -> None:
        limit = self.cfg.claim_idle_ms / 2000.0
        with self._lock:
            old = any(time.monotonic() - t > limit for t in self._inflight.values())
        if old:
            self.touch()

    def touch(self) -> int:
        """Reset the idle time of everything this consumer holds, so nobody reclaims it.

        ``read`` does this by itself; a learner whose update takes longer than
        ``claim_idle_ms / 2`` between reads should call it meanwhile. Returns
        the number of entries still held; ones reclaimed by another consumer
        (we were presumed dead) are forgotten with a warning.
        """
        with self._lock:
            ids = list(self._inflight)
        if not ids:
            return 0
        lost = self._call("touch", lambda: self._touch(keys=[self.stream], args=[self.cfg.group, self.consumer, *ids]))
        now = time.monotonic()
        with self._lock:
            for i in ids:
                if i in self._inflight:
                    self._inflight[i] = now
            for i in map(_s, lost or []):
                self._inflight.pop(i, None)
        if lost:
            log.warning("buffer %s: %d entries held by %s were settled or reclaimed by another consumer",
                        self.stream, len(lost), self.consumer)
        return len(ids) - len(lost or [])

    def split_stale(self, deliveries: Iterable[Delivery], current_version: int) -> tuple[list[Delivery], list[Delivery]]:
        """Split by ``max_staleness``: a group is stale when ``current_version - group.policy_version``
        exceeds it. Stale groups are settled at once (acked, counted ``dropped_stale``); whole
        groups only. Groups from a newer version than ``current_version`` count as fresh.
        """
        fresh: list[Delivery] = []
        stale: list[Delivery] = []
        for d in deliveries:
            (stale if current_version - d.group.policy_version > self.cfg.max_staleness else fresh).append(d)
        if stale:
            self._settle_ids([d.msg_id for d in stale], "dropped_stale")
        return fresh, stale

    def ack(self, msg_ids: Sequence[str]) -> int:
        """Settle entries whose update is committed; returns how many were still pending."""
        ids = [str(m) for m in msg_ids]
        if not ids:
            return 0
        n = self._settle_ids(ids, "acked")
        if n < len(ids):
            log.warning("buffer %s: ack of %d entries settled %d (the rest were already settled)",
                        self.stream, len(ids), n)
        return n

    def _settle_ids(self, ids: list[str], counter: str) -> int:
        n = 0
        for i in range(0, len(ids), 512):  # keep each script call short
            chunk = ids[i:i + 512]
            n += int(self._call(counter, lambda c=chunk: self._settle(
                keys=[self.stream, self.k_stats], args=[self.cfg.group, counter, *c])))
        with self._lock:
            for m in ids:
                self._inflight.pop(m, None)
        return n

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, int]:
        """Counters plus live ``depth`` (never delivered), ``pending`` and ``dead_letters``."""
        def fetch() -> list[Any]:
            pipe = self._r.pipeline(transaction=True)
            pipe.hgetall(self.k_stats)
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.cfg.group)
            pipe.xlen(self.k_dead)
            return pipe.execute()

        raw, length, pend, dead_len = self._call("stats", fetch)
        out = {name: 0 for name in COUNTERS}
        out.update({_s(k): int(v) for k, v in raw.items()})
        pending = int(pend["pending"])
        out.update(depth=int(length) - pending, pending=pending, dead_letters=int(dead_len))
        return out

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest dead-letter entries with their reasons (payload fields omitted)."""
        rows = self._call("dead_letters", lambda: self._r.xrange(self.k_dead, count=count))
        return [
            {"id": _s(i), **{_s(k): _s(v) for k, v in f.items() if _s(k).startswith("dead_") or _s(k) == "gid"}}
            for i, f in rows
        ]

    @property
    def inflight(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> TrajectoryBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
