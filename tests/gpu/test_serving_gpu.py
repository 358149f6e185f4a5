"""GPU serving path (opt-in: `pytest -m gpu tests/gpu`). Never run on the CPU build machine.

1. Packing straight from CUDA tensors (the learner's side of the object-store path):
   exact round trip and a measured seconds-per-GB (printed).
2. The CUDA vLLM engine behind PolicyServer with NCCL weight sync from a learner
   module: the version increments and log-probs match transformers on the new weights.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@cuda
def test_pack_from_cuda_roundtrip_and_seconds_per_gb():
    from services.serving.weights import pack_state_dict_array, unpack_state_dict

    sd = {f"w{i}": torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for i in range(16)}  # ~0.5 GB
    arr = pack_state_dict_array(sd)
    back = unpack_state_dict(arr)
    for k, v in sd.items():
        assert torch.equal(back[k], v.cpu()), k
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    arr = pack_state_dict_array(sd)
    dt = time.perf_counter() - t0
    gb = arr.nbytes / 1e9
    print(f"pack from CUDA: {gb:.2f} GB in {dt:.3f}s = {dt / gb:.3f} s/GB")
    assert dt > 0


@cuda
def test_nccl_weight_sync_into_cuda_vllm(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("ray")
    import ray
    from transformers import AutoModelForCausalLM

    from services.config import ModelConfig, ServingConfig
    from services.serving.app import deploy_policy
    from services.serving.gpu import NcclPublisher
    from services.serving.tiny_model import DEFAULT_CORPUS, build_tiny_model
    from tests.integration.test_serving import SAMPLING, assert_logprobs_match

    if torch.cuda.device_count() < 2:
        pytest.skip("the learner and the replica each need a GPU for NCCL")
    model_dir = build_tiny_model(tmp_path / "m", DEFAULT_CORPUS * 10)
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False)
    try:
        dep = deploy_policy(ModelConfig(path=str(model_dir), tiny=False),
                            ServingConfig(num_gpus=1, gpu_memory_utilization=0.3, enforce_eager=True), port=0)
        learner = AutoModelForCausalLM.from_pretrained(str(model_dir)).cuda()
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(0.3 * torch.randn_like(p))
        pub = NcclPublisher(dep.handle, "127.0.0.1", 29517, replica_world_size=1)
        seconds = pub.publish(learner, version=1)
        print(f"NCCL publish of the tiny model: {seconds:.3f}s")
        gens = asyncio.run(dep.client.agenerate([[5, 6, 7, 8]], SAMPLING, min_version=1))
        assert gens[0].policy_version == 1
        assert_logprobs_match(learner.float().cpu().eval(), [5, 6, 7, 8], gens[0])
        dep.shutdown()
    finally:
        ray.shutdown()
