"""Policy loss: PPO clip, dual clip, masks, aggregation modes, k3 KL, entropy bonus."""

from __future__ import annotations

import math

import pytest
import torch

from proxmo.config import LossConfig
from proxmo.losses import aggregate, policy_loss

NO_EXTRAS = LossConfig(kl_coef=0.0, entropy_coef=0.0)


def one_token(ratio: float, adv: float, cfg: LossConfig = NO_EXTRAS) -> float:
    logp = torch.tensor([[math.log(ratio)]])
    return float(policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), cfg=cfg).loss)


@pytest.mark.parametrize(("ratio", "adv", "expected"), [
    (1.5, 1.0, -1.2),    # positive A: ratio clipped at 1 + 0.2 -> -A * 1.2
    (0.5, 1.0, -0.5),    # positive A, ratio below 1 - eps: min of the two objectives keeps -0.5
    (0.5, -1.0, 0.8),    # negative A: max(0.5, 0.8) = 0.8 (clipped at 1 - 0.2)
    (2.0, -1.0, 2.0),    # negative A, ratio 2: max(2.0, 1.2) = 2.0, below the dual bound 3
    (5.0, -1.0, 3.0),    # negative A, ratio 5: dual clip caps the loss at -A * c = 3
    (1.0, 2.0, -2.0),    # on-policy: -A
])
def test_clip_and_dual_clip(ratio, adv, expected):
    assert one_token(ratio, adv) == pytest.approx(expected, rel=1e-6)


def test_asymmetric_clip_high():
    cfg = LossConfig(kl_coef=0.0, entropy_coef=0.0, clip_ratio=0.2, clip_ratio_high=0.28)
    assert one_token(1.5, 1.0, cfg) == pytest.approx(-1.28, rel=1e-6)


def test_gradient_is_zero_where_clipped():
    logp = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), cfg=NO_EXTRAS)
    out.loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] == pytest.approx(-0.5)
    assert out.metrics["clipfrac"] == pytest.approx(0.5)


def test_masked_tokens_do_not_count():
    logp = torch.tensor([[0.0, 5.0, 0.0]])  # the middle token is padding with a wild log-prob
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    out = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, cfg=NO_EXTRAS)
    assert float(out.loss) == pytest.approx(-1.0)


def test_aggregation_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # last row: no tokens
    assert float(aggregate(values, mask, "token-mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.0) / 2)
    assert float(aggregate(values, mask, "seq-mean-token-sum")) == pytest.approx((6.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(values, mask, "sum")
    assert float(aggregate(values, torch.zeros_like(mask), "token-mean")) == 0.0  # no tokens: 0, not NaN


def test_k3_kl_zero_when_equal_and_positive_otherwise():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    cfg = LossConfig(kl_coef=1.0, entropy_coef=0.0)
    args = (logp, logp, torch.tensor([0.0]), torch.ones(1, 3))
    assert policy_loss(*args, ref_logprobs=logp.clone(), cfg=cfg).metrics["kl"] == 0.0
    ref = torch.log(torch.tensor([[0.3, 0.4, 0.3]]))
    d = ref - logp
    want = float((torch.exp(d) - d - 1).mean())
    out = policy_loss(*args, ref_logprobs=ref, cfg=cfg)
    assert out.metrics["kl"] == pytest.approx(want) and want > 0
    assert float(out.loss) == pytest.approx(want)  # A = 0: the loss is the KL term alone


def test_entropy_bonus_lowers_the_loss():
    logp = torch.zeros(2, 2)
    ent = torch.full((2, 2), 2.0)
    cfg = LossConfig(kl_coef=0.0, entropy_coef=0.1)
    out = policy_loss(logp, logp, torch.tensor([1.0, 1.0]), torch.ones(2, 2), entropy=ent, cfg=cfg)
    assert float(out.loss) == pytest.approx(-1.0 - 0.2)


def test_token_level_advantages_and_shape_errors():
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    out = policy_loss(logp, logp, adv, torch.ones(2, 2), cfg=NO_EXTRAS)
    assert float(out.loss) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        policy_loss(logp, logp, adv, torch.ones(2, 3), cfg=NO_EXTRAS)
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logp, logp, torch.ones(3), torch.ones(2, 2), cfg=NO_EXTRAS)
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(logp, logp, torch.tensor([float("nan"), 0.0]), torch.ones(2, 2), cfg=NO_EXTRAS)
