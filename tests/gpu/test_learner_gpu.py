"""Opt-in (`make test-gpu`): the learner's update on a CUDA device matches the CPU update.

Uses a tiny model with *tied* embeddings, the layout of Qwen2.5-1.5B, so the tied-weight path
of the optimizer step and of the state dict published to the endpoint is exercised on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_update_matches_cpu(tmp_path):
    from proxmo.config import AdvantageConfig, LossConfig
    from services.config import LearnerConfig
    from services.learner import Learner
    from services.serving.tiny_model import build_tiny_model
    from tests.unit.services.test_learner import CORPUS, _groups, _params

    model_dir = str(build_tiny_model(tmp_path / "m", CORPUS, hidden=64, layers=2, heads=2, intermediate=128,
                                     tie_embeddings=True, seed=0))
    groups = _groups(model_dir)
    out = {}
    for device in ("cpu", "cuda"):
        learner = Learner(model_dir, LearnerConfig(lr=1e-3, device=device, seed=0), AdvantageConfig(), LossConfig())
        learner.update(groups)
        out[device] = _params(learner).cpu()
        sd = learner.state_dict()
        assert all(t.device.type == "cpu" for t in sd.values())  # what the publisher packs
    assert torch.allclose(out["cpu"], out["cuda"], atol=1e-4)
