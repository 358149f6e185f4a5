"""`proxmo bench engine-memory`: memory of the vLLM CPU worker under varied batch shapes.

Starts the engine in this process (the vLLM worker runs in a child process), then
runs ``--rounds`` rounds; each sends a random number (1-64) of prompts of random
length (30-400 tokens) at once, as rollouts do, and with ``--reload`` also stages
new weights and reloads them in place. Every 10 rounds it prints the PSS of the
worker and of this process.

It isolates what the 22-minute soak of session 2 showed: the worker grew ~0.5 GB.
oneDNN caches one compiled GEMM primitive per input shape, 1024 by default, and
rollouts keep producing new shapes; ``serving.onednn_cache_capacity`` (default 64)
bounds that cache. Compare ``--onednn-cache 1024`` with the default.

Last line: ``worker_growth_mb=<last - first sample after warm-up> rounds=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

MB = 1024.0 * 1024.0


def _worker_pss() -> float:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "Worker" in child.name():
                return child.memory_full_info().pss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return float("nan")


async def _run(args: argparse.Namespace) -> int:
    import psutil
    from safetensors.torch import load_file

    from services.config import ModelConfig, ServingConfig
    from services.serving.engine import VLLMEngine
    from services.serving.weights import pack_state_dict, stage_weights, staging_dir

    model = ModelConfig(path=args.model, max_model_len=512)
    engine = VLLMEngine(model, ServingConfig(onednn_cache_capacity=args.onednn_cache))
    vocab = engine.raw.tokenizer.vocab_size if hasattr(engine.raw, "tokenizer") else 200
    rng = random.Random(args.seed)
    state = load_file(f"{args.model}/model.safetensors") if args.reload else {}
    stage = staging_dir() if args.reload else None
    sampling = {"max_tokens": 24, "temperature": 1.0}
    await engine.generate([5, 6, 7], sampling, "warm-up")
    samples: list[float] = []
    t0 = time.perf_counter()
    try:
        for i in range(args.rounds):
            k = rng.randint(1, 64)
            prompts = [[rng.randrange(5, max(vocab, 6)) for _ in range(rng.randint(30, 400))] for _ in range(k)]
            await asyncio.gather(*(engine.generate(p, sampling, f"r{i}-{j}") for j, p in enumerate(prompts)))
            if args.reload:
                stage_weights(pack_state_dict({n: t + 1e-3 * (i + 1) for n, t in state.items()}), stage)
                await engine.pause("wait")
                await engine.reload(str(stage))
                await engine.resume()
            if (i + 1) % 10 == 0:
                w, me = _worker_pss(), psutil.Process().memory_full_info().pss / MB
                samples.append(w)
                print(f"round={i + 1} worker_pss_mb={w:.1f} engine_client_pss_mb={me:.1f} "
                      f"seconds={time.perf_counter() - t0:.0f}", flush=True)
    finally:
        engine.shutdown()
    settled = samples[len(samples) // 4:] or samples  # the first quarter is warm-up
    growth = settled[-1] - settled[0] if settled else float("nan")
    print(f"worker_growth_mb={growth:.1f} rounds={args.rounds}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench engine-memory", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="artifacts/tiny-model", help="a model folder (the quick start's by default)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--onednn-cache", type=int, default=64, help="ONEDNN_PRIMITIVE_CACHE_CAPACITY (oneDNN's own: 1024)")
    ap.add_argument("--reload", action="store_true", help="also reload perturbed weights after every round")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.rounds < 10 or args.onednn_cache < 0:
        ap.error("--rounds must be >= 10 and --onednn-cache >= 0")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
