"""Serving tests that start extra vLLM engines (30-90 s each here): marked slow.

- A replica added after two weight updates serves the newest version before it
  takes traffic, and session ids stick to one replica.
- A model with tied embeddings (as Qwen2.5-1.5B): log-probs still match
  transformers after in-place updates (the CPU build's stale tied head is
  repaired by worker_ext.ProxmoWorkerExtension).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.serving_fixtures import SERVING_CORPUS
from tests.integration.test_serving import SAMPLING, assert_logprobs_match, hf_model, perturbed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_replica_added_later_serves_newest_version_and_sessions_stick(policy_app):
    client = policy_app.client
    base = policy_app.initial_state
    v0 = policy_app.current_version()
    for k in (1, 2):
        client.publish_weights(perturbed(base, seed=100 + k), v0 + k)
        client.wait_for_version(v0 + k, timeout_s=120)
    newest = v0 + 2
    try:
        client.set_replicas(2)  # waits until the app is running with 2 replicas
        assert client.running_replicas() == 2
        client.wait_for_version(newest, timeout_s=60)
        versions = client.replica_versions()  # replicas are rolled on rescale: all are new here
        assert len(versions) >= 2 and set(versions.values()) == {newest}, versions
        # Immediately after start, with no min_version: every response comes from the newest weights.
        prompts = [[40 + i, 41, 42] for i in range(16)]
        gens = client.generate(prompts, SAMPLING, session_ids=[f"ep-{i}" for i in range(16)])
        assert {g.policy_version for g in gens} == {newest}
        model = hf_model(policy_app.model_dir, perturbed(base, seed=102))
        for p, g in zip(prompts[:4], gens[:4]):
            assert_logprobs_match(model, p, g)

        async def replica_of(session: str) -> str:
            r = await client.target.generate.remote([7, 8, 9], {**SAMPLING, "max_tokens": 2}, session_id=session)
            return r["replica_id"]

        async def probe() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for s in [f"ep-{i}" for i in range(8)]:
                out[s] = {await replica_of(s) for _ in range(3)}
            return out

        seen = asyncio.run(probe())
        assert all(len(r) == 1 for r in seen.values()), f"a session moved between replicas: {seen}"
        assert len(set().union(*seen.values())) == 2, "sessions did not spread over both replicas"
    finally:
        client.set_replicas(1)
        policy_app.restore_initial()


def test_tied_embeddings_logprobs_match_after_updates(tmp_path):
    """In-process PolicyServer (real engine, plain WeightStore) on a tied-embedding model."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    from services.config import ModelConfig, ServingConfig
    from services.serving.client import PolicyClient
    from services.serving.server import PolicyServer
    from services.serving.tiny_model import build_tiny_model
    from services.serving.weights import WeightStore

    model_dir = build_tiny_model(tmp_path / "tied", SERVING_CORPUS * 10, vocab_size=1024, tie_embeddings=True)
    base = load_file(str(model_dir / "model.safetensors"))
    store = WeightStore()

    async def scenario() -> None:
        server = PolicyServer(ModelConfig(path=str(model_dir), tiny=False),
                              ServingConfig(gpu_memory_utilization=0.1, weight_poll_s=0.2), weight_store=store)
        await server.start()
        try:
            assert await server.engine.tied_heads() == 1
            client = PolicyClient(server, weight_store=store)
            prompt = [5, 6, 7, 8, 9]
            gens = await client.agenerate([prompt], SAMPLING)
            assert_logprobs_match(hf_model(model_dir), prompt, gens[0])
            for k in (1, 2):
                # a tied checkpoint from transformers has no lm_head.weight; perturb the shared embedding
                state = perturbed(base, seed=200 + k)
                if k == 2:  # a learner's state_dict() lists the shared tensor under both names
                    state["lm_head.weight"] = state["model.embed_tokens.weight"]
                client.publish_weights(state, k)
                gens = await client.agenerate([prompt], SAMPLING, min_version=k)
                assert gens[0].policy_version == k
                assert_logprobs_match(hf_model(model_dir, state), prompt, gens[0])
        finally:
            await server.close()

    asyncio.run(scenario())


def test_processed_logprobs_at_temperature_match_the_learner(tiny_model_dir):
    """sampling.temperature != 1: the engine's processed log-probs are the learner's softmax(logits / T)."""
    pytest.importorskip("vllm")
    import numpy as np
    import torch

    from services.config import ModelConfig, ServingConfig
    from services.learner import RowTokens, _pad_batch, token_logprobs
    from services.serving.server import PolicyServer

    temperature = 0.7
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22, 23]]

    async def sample():
        server = PolicyServer(ModelConfig(path=str(tiny_model_dir), tiny=False),
                              ServingConfig(gpu_memory_utilization=0.1, logprobs_mode="processed_logprobs"))
        try:
            return [await server.generate(p, {**SAMPLING, "temperature": temperature}) for p in prompts]
        finally:
            await server.close()

    outs = asyncio.run(sample())
    model = hf_model(tiny_model_dir)
    rows = [RowTokens(np.array(p, np.int32), np.array(o["token_ids"], np.int32), np.array(o["logprobs"], np.float32))
            for p, o in zip(prompts, outs)]
    ids, attn, resp = _pad_batch(rows, torch.device("cpu"))
    for t, close in ((temperature, True), (1.0, False)):
        with torch.no_grad():
            lp, _ = token_logprobs(model, ids, attn, mask=resp, temperature=t)
        err = max(float(np.abs(lp[i][resp[i]].numpy() - r.logprobs).max()) for i, r in enumerate(rows))
        assert (err < 1e-3) is close, f"T={t}: max |logprob diff| {err:.2e}"
