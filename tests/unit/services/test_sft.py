"""The supervised warm start: its schedule follows the step count, so a recipe is repeatable."""

from __future__ import annotations

import itertools

from safetensors.torch import load_file

from services.config import SFTConfig
from services.serving.tiny_model import build_tiny_model
from services.sft import _collate, corpus_from_examples, response_nll, sft_train

EXAMPLES = [{"messages": [{"role": "user", "content": f"You see a {o} on the {c}. Actions: take {o} | look around"}],
             "response": f"<action>take {o}</action>"}
            for o in ("apple", "book", "knife", "cup") for c in ("table", "shelf", "counter")]


class _Clock:
    """A fake ``time`` module whose clock advances by the given steps, in turn."""

    def __init__(self, steps):
        self._t, self._steps = 0.0, itertools.cycle(steps)

    def perf_counter(self) -> float:
        self._t += next(self._steps)
        return self._t


def _train(tmp_path, name, monkeypatch, clock_steps, seconds=100.0):
    import services.sft as sft

    model = build_tiny_model(tmp_path / f"{name}-init", corpus_from_examples(EXAMPLES), vocab_size=256, hidden=32,
                             layers=1, heads=2, intermediate=64, seed=0)
    monkeypatch.setattr(sft, "time", _Clock(clock_steps))
    stats = sft_train(model, EXAMPLES, SFTConfig(epochs=4.0, seconds=seconds, lr=3e-3, batch_size=4), seed=0,
                      out_dir=tmp_path / name)
    return stats, load_file(str(tmp_path / name / "model.safetensors"))


def test_a_slow_moment_does_not_change_the_warm_start(tmp_path, monkeypatch):
    steady, w_steady = _train(tmp_path, "steady", monkeypatch, [0.1])
    # the first steps take a third of the time cap, the rest are fast: the cap is never reached
    jittery, w_jittery = _train(tmp_path, "jittery", monkeypatch, [0.1, 15.0, 15.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert steady["sft_steps"] == jittery["sft_steps"] == steady["sft_planned_steps"] == 12
    assert all(w_steady[k].equal(w_jittery[k]) for k in w_steady)


def test_the_time_cap_stops_the_run_early(tmp_path, monkeypatch):
    stats, _ = _train(tmp_path, "capped", monkeypatch, [1.0], seconds=10.0)
    assert 0 < stats["sft_steps"] < stats["sft_planned_steps"]


def test_the_loss_is_transformers_causal_lm_loss_with_or_without_the_shared_prefix(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "m", corpus_from_examples(EXAMPLES), vocab_size=256, hidden=32, layers=1,
                            heads=2, intermediate=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    head = torch.randint(5, 200, (12,), generator=g).tolist()
    batch = [(head + torch.randint(5, 200, (3 + i,), generator=g).tolist(), torch.randint(5, 200, (2 + i % 3,), generator=g).tolist())
             for i in range(5)]
    ids, attn, labels = _collate(batch, 0)
    reference = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    for share in (False, True):
        torch.testing.assert_close(response_nll(model, ids, attn, labels, share), reference, rtol=1e-5, atol=1e-6)
