"""PPO-style policy loss with dual clip, k3 KL to a reference policy and an entropy bonus.

Per token (r = exp(logp - old_logp), A the advantage broadcast over response tokens):
    L_clip = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          (PPO, Schulman et al. 2017)
    L_pg   = min(L_clip, -A c)   where A < 0, else L_clip               (dual clip, Ye et al. 2020)
    k3     = exp(ref - logp) - (ref - logp) - 1                          (Schulman's k3 estimator)
    loss   = agg(L_pg) + kl_coef * agg(k3) - entropy_coef * agg(H)

agg: "token-mean" (sum over all masked tokens / their count), "seq-mean-token-mean"
(mean over sequences of each sequence's token mean), "seq-mean-token-sum" (mean over
sequences of each sequence's token sum).

Departures from verl's implementation: sequences without any unmasked token are left out
of the sequence means (verl divides by zero there), and a batch without any unmasked
token gives loss 0 instead of NaN. The log-ratio is clamped to [-20, 20] before exp, and
k3 to [-10, 10], as verl does, so one stale token cannot overflow the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from proxmo.config import LossConfig

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass
class PolicyLossOutputs:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float] = field(default_factory=dict)


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce per-token values [B, T] with a {0,1} mask [B, T] to a scalar."""
    if agg == "token-mean":
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    tok = mask.sum(dim=-1)
    seq = (values * mask).sum(dim=-1)
    if agg == "seq-mean-token-mean":
        seq = seq / tok.clamp_min(1.0)
    elif agg != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation {agg!r}; known: {', '.join(AGG_MODES)}")
    has_tokens = (tok > 0).to(values.dtype)
    return (seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def _check(name: str, t: torch.Tensor | None, shape: torch.Size) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like logprobs")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                cfg: LossConfig | None = None) -> PolicyLossOutputs:
    """Clipped policy-gradient loss.

    logprobs, old_logprobs, mask, ref_logprobs, entropy: [B, T]; advantages: [B] or [B, T].
    Returns the scalar loss and float metrics (pg_loss, clipfrac, dual_clipfrac, approx_kl,
    kl, entropy, ratio_mean).
    """
    cfg = cfg or LossConfig()
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs), ("entropy", entropy)):
        _check(name, t, shape)
    if cfg.agg not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {cfg.agg!r}; known: {', '.join(AGG_MODES)}")
    if cfg.dual_clip is not None and cfg.dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {cfg.dual_clip}")
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    if adv.shape[0] != shape[0] or adv.shape[-1] not in (1, shape[1]):
        raise ValueError(f"advantages shape {tuple(advantages.shape)} does not fit logprobs {tuple(shape)}")
    if not bool(torch.isfinite(adv).all()):
        raise ValueError("advantages contain NaN/inf")
    mask = mask.to(logprobs.dtype)
    adv = adv.expand(shape)

    log_ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    low = cfg.clip_ratio
    high = cfg.clip_ratio if cfg.clip_ratio_high is None else cfg.clip_ratio_high
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    dual_active = torch.zeros_like(pg, dtype=torch.bool)
    if cfg.dual_clip is not None:
        bound = -adv * cfg.dual_clip
        dual_active = (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    loss = aggregate(pg, mask, cfg.agg)
    metrics = {"pg_loss": float(loss.detach())}
    if ref_logprobs is not None and cfg.kl_coef:
        diff = ref_logprobs.detach() - logprobs
        kl = (torch.exp(diff) - diff - 1.0).clamp(-10.0, 10.0)
        kl_term = aggregate(kl, mask, cfg.agg)
        loss = loss + cfg.kl_coef * kl_term
        metrics["kl"] = float(kl_term.detach())
    if entropy is not None and cfg.entropy_coef:
        ent = aggregate(entropy, mask, cfg.agg)
        loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = float(ent.detach())
    with torch.no_grad():
        n_tok = mask.sum().clamp_min(1.0)
        metrics["clipfrac"] = float(((loss_clipped > loss_unclipped).to(mask.dtype) * mask).sum() / n_tok)
        metrics["dual_clipfrac"] = float((dual_active.to(mask.dtype) * mask).sum() / n_tok)
        metrics["approx_kl"] = float((-log_ratio * mask).sum() / n_tok)
        metrics["ratio_mean"] = float((ratio * mask).sum() / n_tok)
    return PolicyLossOutputs(loss=loss, metrics=metrics)
