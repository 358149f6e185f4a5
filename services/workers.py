"""An elastic pool of rollout worker actors, driven from the driver process.

The pool hands out *chunks* of assignments (as many groups as a worker runs
side by side) to idle workers, so a worker added mid-run gets work at once and
a worker removed mid-run finishes its chunk first (graceful scale-down).
A worker that dies (killed, node lost, OOM) is replaced and its chunk is
re-run under the same group ids: groups it already pushed are rejected by the
buffer's idempotent push, unfinished ones are re-run whole. Nothing is
half-counted.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from services.rollout import Assignment, GroupSummary

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, make_worker: Callable[[str], Any], size: int, *, groups_per_chunk: int = 1,
                 min_size: int = 1, max_size: int = 64, max_attempts: int = 3):
        self._make = make_worker
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.workers: dict[str, Any] = {}
        self.retiring: set[str] = set()
        self.groups_per_chunk = max(groups_per_chunk, 1)
        self.min_size, self.max_size, self.max_attempts = min_size, max_size, max_attempts
        self.replaced = 0
        self.desired = 0
        self._busy: set[str] = set()  # workers with a chunk in flight
        self.scale(size)

    # ------------------------------------------------------------------ size

    def _add(self) -> None:
        wid = f"rollout-{next(self._ids)}"
        self.workers[wid] = self._make(wid)

    def scale(self, n: int) -> int:
        """Set the number of workers (clamped to [min_size, max_size]); returns the new target."""
        import ray

        with self._lock:
            n = max(self.min_size, min(self.max_size, int(n)))
            self.desired = n
            active = [w for w in self.workers if w not in self.retiring]
            for _ in range(n - len(active)):
                self._add()
            for wid in active[n:]:
                self.retiring.add(wid)  # killed once its current chunk is done
            idle_retiring = [w for w in self.retiring if w not in self._busy]
            for wid in idle_retiring:
                ray.kill(self.workers.pop(wid), no_restart=True)
                self.retiring.discard(wid)
            return n

    def size(self) -> int:
        with self._lock:
            return len([w for w in self.workers if w not in self.retiring])

    # ------------------------------------------------------------------ run

    def run(self, assignments: list[Assignment], *, greedy: bool = False, push: bool = True,
            timeout_s: float = 3600.0) -> list[GroupSummary]:
        """Run all assignments; returns one summary per assignment (re-runs included once)."""
        import ray
        from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError

        todo = deque(assignments[i : i + self.groups_per_chunk] for i in range(0, len(assignments), self.groups_per_chunk))
        inflight: dict[Any, tuple[str, list[Assignment]]] = {}
        done: list[GroupSummary] = []
        deadline = time.monotonic() + timeout_s
        while todo or inflight:
            with self._lock:
                for wid in [w for w in self.workers if w not in self._busy and w not in self.retiring]:
                    if not todo:
                        break
                    chunk = todo.popleft()
                    ref = self.workers[wid].run.remote(chunk, greedy=greedy, push=push)
                    inflight[ref] = (wid, chunk)
                    self._busy.add(wid)
            if not inflight:
                raise RuntimeError("rollout pool has no workers to run on")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout did not finish in {timeout_s:.0f} s")
            for ref in ready:
                wid, chunk = inflight.pop(ref)
                self._busy.discard(wid)
                try:
                    done.extend(ray.get(ref))
                except (RayActorError, GetTimeoutError, OutOfMemoryError) as exc:
                    self._replace(wid, exc)
                    retry = [replace(a, attempt=a.attempt + 1) for a in chunk]
                    if retry[0].attempt >= self.max_attempts:
                        raise RuntimeError(f"chunk {[a.group_id for a in chunk]} failed {self.max_attempts} times") from exc
                    todo.appendleft(retry)
            self._retire_idle()
        return done

    def _replace(self, wid: str, exc: BaseException) -> None:
        log.warning("rollout worker %s died (%s); replacing it and re-running its groups", wid, type(exc).__name__)
        import ray

        with self._lock:
            handle = self.workers.pop(wid, None)
            if handle is not None:  # an OOM-killed task may leave its actor alive: stop it for good
                try:
                    ray.kill(handle, no_restart=True)
                except Exception:  # already dead
                    pass
            if wid in self.retiring:
                self.retiring.discard(wid)
            else:
                self._add()
            self.replaced += 1

    def _retire_idle(self) -> None:
        import ray

        with self._lock:
            for wid in [w for w in self.retiring if w not in self._busy]:
                ray.kill(self.workers.pop(wid), no_restart=True)
                self.retiring.discard(wid)

    # ------------------------------------------------------------------ eval & stats

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        import ray

        with self._lock:
            handles = list(self.workers.values())
        return ray.get([getattr(h, method).remote(*args, **kwargs) for h in handles])

    def evaluate(self, tasks: list, *, greedy: bool, sample_seeds: list[int] | None = None) -> list:
        """One episode per task, spread over the workers, returned in the order of ``tasks``; nothing pushed."""
        import ray

        with self._lock:
            handles = list(self.workers.values())
        k = len(handles)
        calls = [h.episodes.remote(tasks[i::k], greedy=greedy,
                                   sample_seeds=None if sample_seeds is None else sample_seeds[i::k])
                 for i, h in enumerate(handles) if tasks[i::k]]
        out: list = [None] * len(tasks)
        for i, eps in enumerate(ray.get(calls)):
            out[i::k] = eps
        return out

    def shutdown(self) -> None:
        import ray

        with self._lock:
            for h in self.workers.values():
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # already gone
                    pass
            self.workers.clear()
