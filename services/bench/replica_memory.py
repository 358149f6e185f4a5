"""`proxmo bench replica-memory`: private memory (USS) of the Serve policy replica.

Deploys the policy app on a local Ray and runs ``--rounds`` rounds of one kind:
``requests`` (64 prompts per round, each with its own session id, as rollouts send
them) or ``publish`` (a new weight version per round, no requests). Every 20 rounds
it prints the replica's USS. Written to find the growth the session-3 soak showed
in the replica (about 2 MB per training iteration): it comes with requests
(~2.8 KB each), not with weight updates (BENCHMARKS.md).

Last line: ``replica_uss_growth_kb_per_round=<x> mode=<m> rounds=<n>``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

MB = 1024.0 * 1024.0


def _replica_uss() -> float:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica"):
                return p.memory_full_info().uss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxmo bench replica-memory", description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("requests", "publish"))
    ap.add_argument("--rounds", type=int, default=120)
    ap.add_argument("--model", default="artifacts/tiny-model")
    ap.add_argument("--trace", action="store_true",
                    help="tracemalloc in the replica from round 20; print the sites that grew most at the end")
    args = ap.parse_args(argv)
    if args.rounds < 40:
        ap.error("--rounds must be >= 40 (the first 20 are warm-up)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from services.config import ModelConfig, ServingConfig
    from services.serving.app import deploy_policy

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    dep = deploy_policy(ModelConfig(path=args.model), ServingConfig(num_cpus=0.5), port=0)
    rng = random.Random(0)
    state = load_file(f"{args.model}/model.safetensors") if args.mode == "publish" else {}
    vocab = len(AutoTokenizer.from_pretrained(args.model))
    samples: list[float] = []
    try:
        for i in range(args.rounds):
            if args.mode == "requests":
                prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(100, 300))] for _ in range(64)]
                dep.client.generate(prompts, {"max_tokens": 16, "temperature": 1.0},
                                    session_ids=[f"s{i}-{j}" for j in range(64)])
            else:
                dep.client.publish_weights({k: v + 1e-3 * (i + 1) for k, v in state.items()}, i + 1)
                dep.client.wait_for_version(i + 1, 120)
            if (i + 1) % 20 == 0:
                samples.append(_replica_uss())
                print(f"round={i + 1} replica_uss_mb={samples[-1]:.1f}", flush=True)
                if args.trace and i + 1 == 20:
                    dep.handle.memory_trace.remote("start").result()
                elif args.trace:  # at every sample, so a run cut short still tells
                    print("python allocations grown in the replica since round 20 (tracemalloc):")
                    for line in dep.handle.memory_trace.remote("diff", 12).result():
                        print("  " + line, flush=True)
                    for line in dep.handle.memory_trace.remote("logging").result():
                        print("  " + line, flush=True)
    finally:
        dep.shutdown()
        ray.shutdown()
    rounds = 20 * (len(samples) - 1)
    growth_kb = (samples[-1] - samples[0]) * 1024.0 / rounds if rounds else float("nan")
    print(f"replica_uss_growth_kb_per_round={growth_kb:.1f} mode={args.mode} rounds={args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
