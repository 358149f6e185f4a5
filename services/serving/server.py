"""PolicyServer: one policy replica (engine + version bookkeeping), a plain class.

The composition root (``app.py``) wraps it in a Ray Serve deployment with an
OpenAI-compatible FastAPI ingress; tests can run it in-process with a real
engine and a plain :class:`~services.serving.weights.WeightStore`.

Versioning rules (issue 4, item 2):
- Every response carries the version of the weights that produced all of its
  tokens. A swap closes an admission gate, waits for in-flight requests to
  finish on the old weights (``swap_drain_timeout_s``), then reloads in place,
  clears the KV/prefix cache and reopens. Requests that arrive meanwhile wait
  at the gate and run on the new weights.
- Requests still running when the drain times out are aborted by the engine
  and answered with ``finish_reason="abort"`` and ``swap_aborted=True``: marked,
  never silently mixed.
- :meth:`start` pulls the current version from the WeightStore before the
  replica reports ready, so a replica started later never serves stale weights;
  a background long-poll keeps it current afterwards and doubles as heartbeat.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import time
import uuid
from typing import Any

from services.config import ModelConfig, ServingConfig
from services.serving.weights import WeightError, stage_weights, staging_dir

log = logging.getLogger(__name__)


class StaleVersionError(RuntimeError):
    """The replica cannot serve the requested minimum policy version in time."""


async def _call(target: Any, method: str, *args: Any) -> Any:
    """Call ``method`` on a plain object or a Ray actor handle, awaiting whatever comes back."""
    fn = getattr(target, method)
    remote = getattr(fn, "remote", None)
    result = remote(*args) if remote is not None else fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _resolve_payload(payload: list[Any]) -> Any:
    """``[ObjectRef]`` -> its value (zero-copy numpy view when local); ``[bytes]`` -> bytes."""
    item = payload[0]
    if type(item).__name__ == "ObjectRef":
        return await item
    return item


class PolicyServer:
    """One replica: generates with an injected engine and keeps its weights current."""

    def __init__(self, model_cfg: ModelConfig, serving_cfg: ServingConfig, *, engine: Any = None,
                 weight_store: Any = None, replica_id: str | None = None, tokenizer: Any = None) -> None:
        self.model_cfg = model_cfg
        self.cfg = serving_cfg
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        if engine is None:
            from services.serving.engine import VLLMEngine

            engine = VLLMEngine(model_cfg, serving_cfg)
        self.engine = engine
        self._tokenizer = tokenizer
        self.store = weight_store
        self.version = 0
        self._open = asyncio.Event()
        self._open.set()
        self._inflight: dict[str, int] = {}  # request id -> version it started on
        self._aborted_by_swap: set[str] = set()
        self._swap_lock = asyncio.Lock()
        self._stage = staging_dir(f"proxmo-{self.replica_id}-")
        self._poller: asyncio.Task | None = None
        self._closed = False
        self.swaps = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.path)
        return self._tokenizer

    async def start(self) -> None:
        """Load the store's current version, register, then keep polling (call before serving)."""
        if self.store is None:
            return
        version, payload = await _call(self.store, "latest")
        if payload is not None and version > self.version:
            await self.apply_weights(version, payload)
        await _call(self.store, "report", self.replica_id, self.version)
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while not self._closed:
            try:
                version, payload = await _call(self.store, "wait_newer", self.version, self.cfg.weight_poll_s)
                if payload is not None and version > self.version:
                    await self.apply_weights(version, payload)
                await _call(self.store, "report", self.replica_id, self.version)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving; the next poll retries
                log.exception("replica %s: weight poll failed", self.replica_id)
                await asyncio.sleep(self.cfg.weight_poll_s)

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        if self.store is not None:
            try:
                await _call(self.store, "forget", self.replica_id)
            except Exception:
                log.warning("replica %s: could not unregister from the weight store", self.replica_id)
        shutil.rmtree(self._stage, ignore_errors=True)
        self.engine.shutdown()

    # ------------------------------------------------------------------ weights

    async def apply_weights(self, version: int, payload: list[Any]) -> dict[str, Any]:
        """Swap to ``version`` (no-op when already at or past it); see the module docstring."""
        async with self._swap_lock:
            if version <= self.version:
                return {"version": self.version, "applied": False}
            t0 = time.perf_counter()
            data = await _resolve_payload(payload)
            if data is None or len(data) < 8:
                raise WeightError(f"replica {self.replica_id}: empty weight payload for version {version}")
            stage_weights(data, self._stage)  # before the gate closes: requests keep flowing
            t_staged = time.perf_counter()
            await self.begin_swap()
            ok = False
            try:
                info = await self.engine.reload(str(self._stage))
                ok = True
            finally:
                await self.end_swap(version if ok else None)
            t_end = time.perf_counter()
        log.info("replica %s: now at v%d (stage %.3fs, swap %.3fs)", self.replica_id, version,
                 t_staged - t0, t_end - t_staged)
        return {"version": version, "applied": True, "stage_s": t_staged - t0,
                "swap_s": t_end - t_staged, **(info or {})}

    async def begin_swap(self) -> bool:
        """Close the gate, drain (or abort and mark) in-flight requests, pause the engine."""
        self._open.clear()
        drained = await self._drain(self.cfg.swap_drain_timeout_s)
        if not drained:
            self._aborted_by_swap.update(self._inflight)
            log.warning("replica %s: %d requests aborted by a weight swap", self.replica_id, len(self._inflight))
        try:
            await self.engine.pause("wait" if drained else "abort")
        except BaseException:
            self._open.set()
            raise
        return drained

    async def end_swap(self, version: int | None) -> None:
        """Resume the engine; adopt ``version`` (None: the update failed, keep the old label)."""
        try:
            await self.engine.resume()
            if version is not None and version > self.version:
                self.version = version
                self.swaps += 1
        finally:
            self._open.set()

    async def weight_sync(self, op: str, payload: Any = None, version: int = 0) -> dict[str, Any]:
        """GPU path: one step of an NCCL weight update driven by the learner (see gpu.py)."""
        from services.serving.gpu import replica_weight_sync

        return await replica_weight_sync(self, op, payload, version)

    async def _drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self._inflight

    async def _ensure_version(self, min_version: int | None) -> None:
        if min_version is None or self.version >= min_version:
            return
        if self.store is None:
            raise StaleVersionError(f"replica at v{self.version} < requested v{min_version} and no weight store")
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while self.version < min_version and time.monotonic() < deadline:
            version, payload = await _call(self.store, "latest")
            if payload is not None and version > self.version:
                await self.apply_weights(version, payload)
            elif version < min_version:
                await asyncio.sleep(0.05)
        if self.version < min_version:
            raise StaleVersionError(f"replica at v{self.version} < requested v{min_version}")

    # ------------------------------------------------------------------ generation

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any], *, session_id: str | None = None,
                       min_version: int | None = None, request_id: str | None = None) -> dict[str, Any]:
        """Sample one continuation; returns token ids, log-probs, text and the policy version."""
        del session_id  # used by the request router; kept in the signature so it can see it
        if not prompt_ids or not all(isinstance(t, int) and t >= 0 for t in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-negative ints")
        max_tokens = int(sampling.get("max_tokens", 32))
        if len(prompt_ids) + max_tokens > self.model_cfg.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"max_model_len ({self.model_cfg.max_model_len})")
        await self._ensure_version(min_version)
        while not self._open.is_set():
            await self._open.wait()
        rid = request_id or uuid.uuid4().hex
        version = self.version
        self._inflight[rid] = version  # no await between the gate check and this line
        try:
            out = await asyncio.wait_for(self.engine.generate(prompt_ids, sampling, rid),
                                         timeout=self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            await self.engine.abort(rid)
            raise TimeoutError(f"request {rid} exceeded request_timeout_s={self.cfg.request_timeout_s}") from None
        finally:
            self._inflight.pop(rid, None)
        aborted = rid in self._aborted_by_swap
        self._aborted_by_swap.discard(rid)
        return {"token_ids": out.token_ids, "logprobs": out.logprobs, "text": out.text,
                "finish_reason": "abort" if aborted else out.finish_reason, "policy_version": version,
                "swap_aborted": aborted, "prompt_tokens": out.prompt_tokens, "replica_id": self.replica_id}

    async def generate_batch(self, prompts: list[list[int]], sampling: dict[str, Any], *,
                             min_version: int | None = None) -> list[dict[str, Any]]:
        """Many prompts at once on this replica (the engine batches them)."""
        return list(await asyncio.gather(*(self.generate(p, sampling, min_version=min_version) for p in prompts)))

    # ------------------------------------------------------------------ status

    async def health(self) -> dict[str, Any]:
        await self.engine.check_health()
        return {"status": "ok", "policy_version": self.version, "replica_id": self.replica_id,
                "inflight": len(self._inflight), "swaps": self.swaps}

    async def check_health(self) -> None:
        """Ray Serve's health hook: raising marks the replica unhealthy and restarts it."""
        await self.engine.check_health()

    def get_version(self) -> int:
        return self.version

    def memory_trace(self, op: str, top: int = 15) -> list[str]:
        """Diagnostics, reachable through the deployment handle only (no HTTP route).

        ``start``: begin tracemalloc (10 frames) and keep a baseline snapshot; ``diff``: the
        ``top`` allocation sites that grew most since the baseline, one line each; ``stop``;
        ``logging``: the Serve logger's handlers, whether their target is open and what they buffer.
        Used by ``proxmo bench replica-memory --trace`` (issue 9).
        """
        import tracemalloc

        if op == "start":
            tracemalloc.start(10)
            self._trace_base = tracemalloc.take_snapshot()
            return []
        if op == "logging":  # what issue 9's replica growth was: a closed MemoryHandler buffering forever
            import logging.handlers

            return [f"{type(h).__name__} buffered={len(h.buffer)} capacity={h.capacity} "
                    f"target={'open' if h.target is not None else 'closed'}"
                    for h in logging.getLogger("ray.serve").handlers if isinstance(h, logging.handlers.MemoryHandler)]
        if op == "stop":
            tracemalloc.stop()
            self._trace_base = None
            return []
        if op != "diff":
            raise ValueError(f"memory_trace: unknown op {op!r} (ops: start, diff, stop, logging)")
        if getattr(self, "_trace_base", None) is None:
            raise ValueError("memory_trace: 'diff' needs 'start' first")
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        lines = []
        for st in snap.compare_to(self._trace_base, "traceback")[:top]:
            recent = list(st.traceback)[::-1][:4]  # tracemalloc lists frames oldest first
            frames = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in recent)
            lines.append(f"{st.size_diff / 1024:+.1f} KiB {st.count_diff:+d} blocks  {frames}")
        return lines
