"""The inference engine behind a PolicyServer replica: vLLM's async engine (CPU or CUDA build).

One class for both builds: the CPU build needs a small ``gpu_memory_utilization``
(the host-memory fraction it reserves), ``VLLM_CPU_KVCACHE_SPACE`` and eager mode;
the CUDA build takes ``tensor_parallel_size`` from the config. Weight updates go
through our worker extension (``worker_ext.py``): the replica stages the packed
weights as a safetensors file and the engine reloads them in place.

The engine object is injected into :class:`~services.serving.server.PolicyServer`;
anything with the same async methods (``generate``, ``reload``, ``pause``,
``resume``, ``check_health``, ``shutdown``) can stand in for it, e.g. the GPU
NCCL path in ``gpu.py``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from services.config import ModelConfig, ServingConfig

log = logging.getLogger(__name__)

WORKER_EXTENSION = "services.serving.worker_ext.ProxmoWorkerExtension"


@dataclass
class EngineOutput:
    """One finished sequence as the engine produced it."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    prompt_tokens: int


def _on_gpu(serving_cfg: ServingConfig) -> bool:
    return serving_cfg.num_gpus > 0


def cpu_engine_env(serving_cfg: ServingConfig) -> None:
    """Environment the CPU build reads when its worker process starts (set before the engine spawns it)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(serving_cfg.kv_cache_gib)
    # Bounded cache of compiled GEMM primitives: one per input shape, and rollouts produce many.
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(serving_cfg.onednn_cache_capacity)


def keep_host_logging() -> None:
    """Stop vLLM from re-configuring Python logging in this process (call before vLLM is imported).

    On import vLLM runs ``logging.config.dictConfig``, which closes every handler that exists.
    Inside a Serve replica that closes Serve's ``MemoryHandler``: its target becomes None, so it
    never flushes again and keeps every later log record (one access-log line per request,
    ~3 KB) for the life of the replica. That was the replica's memory growth in the session-3
    soak (issue 9), and the replica's log file stopped at engine start. With
    ``VLLM_CONFIGURE_LOGGING=0`` vLLM's loggers propagate to the host's handlers instead (warnings
    and errors still reach stderr). A value the user set is kept.
    """
    import sys

    if "vllm" not in sys.modules:
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def engine_args(model_cfg: ModelConfig, serving_cfg: ServingConfig) -> Any:
    """AsyncEngineArgs for this model and serving config (on CPU also sets the engine env, see cpu_engine_env)."""
    keep_host_logging()
    from vllm.engine.arg_utils import AsyncEngineArgs

    extra: dict[str, Any] = {}
    if _on_gpu(serving_cfg):
        from services.serving.gpu import nccl_engine_kwargs

        extra.update(nccl_engine_kwargs())
        if serving_cfg.tensor_parallel_size > 1:
            extra["distributed_executor_backend"] = "ray"  # workers in the replica's placement group
    else:
        cpu_engine_env(serving_cfg)
        # The CPU build cannot rewind a seeded request's generator after a partial (chunked) prefill:
        # its worker dies with "CPU Generator does not use offset" and takes the engine with it. Whole
        # prefills keep seeded sampling (OpenAI `seed`, paired evaluation) working.
        extra["enable_chunked_prefill"] = False
    return AsyncEngineArgs(
        **extra,
        model=model_cfg.path,
        tokenizer=model_cfg.path,
        dtype=model_cfg.dtype,
        max_model_len=model_cfg.max_model_len,
        trust_remote_code=model_cfg.trust_remote_code,
        gpu_memory_utilization=serving_cfg.gpu_memory_utilization,
        enforce_eager=serving_cfg.enforce_eager,
        tensor_parallel_size=serving_cfg.tensor_parallel_size,
        worker_extension_cls=WORKER_EXTENSION,
        logprobs_mode=serving_cfg.logprobs_mode,
        enable_prefix_caching=True,
        disable_log_stats=True,
        seed=serving_cfg.seed,
    )


class VLLMEngine:
    """vLLM ``AsyncLLM`` with the few calls a PolicyServer needs."""

    def __init__(self, model_cfg: ModelConfig, serving_cfg: ServingConfig) -> None:
        keep_host_logging()
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_cfg = model_cfg
        self.serving_cfg = serving_cfg
        self._llm = AsyncLLM.from_engine_args(engine_args(model_cfg, serving_cfg))

    @property
    def raw(self) -> Any:
        """The underlying vLLM engine (benchmarks call it directly)."""
        return self._llm

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any], request_id: str) -> EngineOutput:
        from vllm import SamplingParams

        params = SamplingParams(
            n=1,
            temperature=float(sampling.get("temperature", 1.0)),
            top_p=float(sampling.get("top_p", 1.0)),
            max_tokens=int(sampling.get("max_tokens", 32)),
            logprobs=0,  # the sampled token's log-prob only
            seed=sampling.get("seed"),
            stop=sampling.get("stop") or None,
            stop_token_ids=sampling.get("stop_token_ids") or None,
            skip_special_tokens=True,
            ignore_eos=bool(sampling.get("ignore_eos", False)),  # benchmarks: fixed-length outputs
        )
        final = None
        async for out in self._llm.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError(f"engine returned no output for request {request_id}")
        seq = final.outputs[0]
        ids = list(seq.token_ids)
        lps = [float(seq.logprobs[i][tok].logprob) for i, tok in enumerate(ids)] if seq.logprobs else []
        if len(lps) != len(ids):
            raise RuntimeError(f"engine returned {len(lps)} log-probs for {len(ids)} tokens")
        return EngineOutput(ids, lps, seq.text, str(seq.finish_reason or "abort"), len(prompt_ids))

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def reload(self, weights_dir: str) -> dict[str, Any]:
        """Load ``weights_dir``/model.safetensors into every worker, in place."""
        results = await self._llm.collective_rpc("proxmo_reload", kwargs={"weights_path": str(weights_dir)})
        return results[0] if results else {}

    async def tied_heads(self) -> int:
        results = await self._llm.collective_rpc("proxmo_tied_heads")
        return int(results[0]) if results else 0

    async def pause(self, mode: str = "wait") -> None:
        """Stop scheduling; ``mode`` wait|abort for in-flight requests; KV and prefix cache cleared."""
        await self._llm.pause_generation(mode=mode, clear_cache=True)

    async def resume(self) -> None:
        await self._llm.resume_generation()

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # Drop it now: vLLM's __del__ shuts down again, and at interpreter exit that raises.
            del llm
