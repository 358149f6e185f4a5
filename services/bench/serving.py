"""`proxmo bench serving`: tokens/s through the Serve endpoint vs the same engine called directly.

Same model, same prompts, same sampling (fixed-length outputs via ``ignore_eos``),
same run. Direct: ``VLLMEngine.generate`` (vLLM's AsyncLLM) in this process, all
prompts submitted concurrently. Serve: the deployed PolicyServer (one replica)
through ``PolicyClient.agenerate`` on a DeploymentHandle, batched (one call per
replica; the ratio on the last line) and one call per prompt with session ids
(sticky routing; printed for reference). Both engines run at once and the reps alternate
between the paths (after one warm-up batch each), so load from other processes
hits all paths alike; we report medians of ``--reps`` batches. Last line: ``serve_vs_direct=<ratio>`` (target >= 0.85).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


def _prompts(model_dir: Path, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from services.serving.tiny_model import DEFAULT_CORPUS

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = " ".join(DEFAULT_CORPUS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # distinct prompts (different offsets) so the prefix cache cannot make later reps free
    return [(ids * 4)[i: i + length] for i in range(n)]


async def _timed(run_batch) -> float:
    t0 = time.perf_counter()
    tokens = await run_batch()
    return tokens / (time.perf_counter() - t0)


async def _interleaved(model_cfg, serving_cfg, dep, prompts, sampling, reps) -> dict[str, list[float]]:
    """Both engines live at once; reps alternate so load drift on a shared machine hits all paths alike."""
    from services.serving.engine import VLLMEngine

    engine = VLLMEngine(model_cfg, serving_cfg)
    sids = [f"episode-{i}" for i in range(len(prompts))]

    async def direct() -> int:
        outs = await asyncio.gather(*(engine.generate(p, sampling, uuid.uuid4().hex) for p in prompts))
        return sum(len(o.token_ids) for o in outs)

    async def serve_batched() -> int:
        return sum(len(g.token_ids) for g in await dep.client.agenerate(prompts, sampling))

    async def serve_sessions() -> int:
        gens = await dep.client.agenerate(prompts, sampling, session_ids=sids)
        return sum(len(g.token_ids) for g in gens)

    paths = {"direct": direct, "serve": serve_batched, "serve_per_request": serve_sessions}
    try:
        for fn in paths.values():  # warm-up: the first batch pays one-off costs
            await fn()
        rates: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(reps):
            for name, fn in paths.items():
                rates[name].append(await _timed(fn))
        return rates
    finally:
        engine.shutdown()


def run_bench(model_cfg, serving_cfg, prompts, sampling, reps) -> dict[str, list[float]]:
    import ray

    from services.serving.app import deploy_policy

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    dep = deploy_policy(model_cfg, serving_cfg, port=0)
    try:
        return asyncio.run(_interleaved(model_cfg, serving_cfg, dep, prompts, sampling, reps))
    finally:
        dep.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench serving", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="HF model folder (default: build the tiny model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", dest="json_path", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from services.config import ModelConfig, ServingConfig
    from services.serving.tiny_model import DEFAULT_CORPUS, build_tiny_model

    model_dir = Path(args.model) if args.model else build_tiny_model(
        Path(tempfile.mkdtemp(prefix="proxmo-bench-model-")), DEFAULT_CORPUS * 10)
    model_cfg = ModelConfig(path=str(model_dir), tiny=False)
    serving_cfg = ServingConfig(num_cpus=1.0, gpu_memory_utilization=0.1, app_name="proxmo-bench-serving")
    prompts = _prompts(model_dir, args.prompts, args.prompt_len)
    sampling: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.tokens, "ignore_eos": True}
    rates = run_bench(model_cfg, serving_cfg, prompts, sampling, args.reps)
    direct, served, per_request = rates["direct"], rates["serve"], rates["serve_per_request"]
    d, s, pr = statistics.median(direct), statistics.median(served), statistics.median(per_request)
    print(f"prompts={args.prompts} prompt_len={args.prompt_len} new_tokens={args.tokens} reps={args.reps}")
    print(f"direct engine : {d:9.1f} tokens/s  (reps: {', '.join(f'{x:.0f}' for x in direct)})")
    print(f"through Serve : {s:9.1f} tokens/s  (reps: {', '.join(f'{x:.0f}' for x in served)})"
          "  [batched: one handle call per replica]")
    print(f"Serve, 1 call per prompt with session ids: {pr:9.1f} tokens/s  "
          f"(reps: {', '.join(f'{x:.0f}' for x in per_request)}; ratio {pr / d:.3f})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"direct_tokens_per_s": direct, "serve_tokens_per_s": served, "ratio": s / d,
             "serve_per_request_tokens_per_s": per_request, "per_request_ratio": pr / d,
             "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.tokens}, indent=2))
    print(f"serve_vs_direct={s / d:.3f}")
    return 0
