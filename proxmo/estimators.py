"""Estimator registry and the shared pipeline behind the built-in estimators.

Every estimator has one signature, ``fn(inputs: AdvantageInputs, cfg: AdvantageConfig)
-> AdvantageOutputs``; the learner never branches on the name. Built-ins:

| name                    | episode term A_E            | step term A_S                  |
|-------------------------|-----------------------------|--------------------------------|
| grpo                    | group-normalised score      | none                           |
| gigpo                   | group-normalised score      | exact anchor buckets           |
| gigpo_similarity        | group-normalised score      | difflib-similarity buckets     |
| proxmo                  | modulated (w * A_E)         | proximity soft baseline        |
| proxmo_modulation_only  | modulated (w * A_E)         | exact anchor buckets           |
| proxmo_soft_only        | group-normalised score      | proximity soft baseline        |

A = A_E + omega * A_S with omega = cfg.step_weight. ``norm_by_std`` divides A_E (and the
bucketed A_S) by std + 1e-6. The ablation pairing follows the authors' code: without soft
aggregation ProxMO falls back to GiGPO's exact buckets.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from proxmo.batch import (
    AdvantageInputs,
    AdvantageOutputs,
    Batch,
    anchor_text,
    check_config_numbers,
    factorize,
    prepare,
)
from proxmo.config import AdvantageConfig
from proxmo.episode import beta_from_range, episode_advantage, modulation_weight, success_rate
from proxmo.grouping import exact_buckets, similarity_buckets, step_advantage_buckets
from proxmo.proximity import get_featurizer, is_sparse, soft_step_advantage, unit_rows
from proxmo.returns import apply_invalid_penalty, discounted_returns

Estimator = Callable[[AdvantageInputs, AdvantageConfig], AdvantageOutputs]
_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str, fn: Estimator | None = None):
    """Register ``fn`` under ``name`` (usable as a decorator). A name can be taken once."""

    def add(f: Estimator) -> Estimator:
        if not isinstance(name, str) or not name:
            raise ValueError(f"estimator name must be a non-empty string, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add(fn) if fn is not None else add


def list_estimators() -> list[str]:
    return sorted(_REGISTRY)


def get_estimator(name: str) -> Estimator:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; known estimators: {', '.join(list_estimators())}") from None


def compute_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig | None = None) -> AdvantageOutputs:
    """Run the estimator named by ``cfg.estimator`` on one batch of rows."""
    cfg = cfg or AdvantageConfig()
    return get_estimator(cfg.estimator)(inputs, cfg)


def _check_cfg(cfg: AdvantageConfig) -> float:
    beta = cfg.resolved_beta
    check_config_numbers(gamma=cfg.gamma, invalid_penalty=cfg.invalid_penalty, alpha=cfg.alpha, beta=beta,
                         temperature=cfg.temperature, step_weight=cfg.step_weight,
                         success_threshold=cfg.success_threshold, similarity_threshold=cfg.similarity_threshold)
    if not 0.0 <= cfg.gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {cfg.gamma}")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {cfg.temperature}")
    if cfg.alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {cfg.alpha}")
    if cfg.stats_over not in ("rows", "trajectories"):
        raise ValueError(f"stats_over must be 'rows' or 'trajectories', got {cfg.stats_over!r}")
    return beta


def _soft_step(b: Batch, step_return: np.ndarray, cfg: AdvantageConfig) -> np.ndarray:
    texts_by_anchor = [anchor_text(a) for a in b.anchor_values]
    text_of_anchor, texts = factorize(texts_by_anchor)
    text_code = text_of_anchor[b.anchor]
    counts = np.bincount(text_code, minlength=len(texts))
    feats = get_featurizer(cfg.featurizer)(texts, counts, cfg)
    if not is_sparse(feats):
        feats = np.asarray(feats, dtype=np.float64)
    if len(feats.shape) != 2 or feats.shape[0] != len(texts):
        raise ValueError(f"featurizer {cfg.featurizer!r} returned shape {feats.shape}, expected ({len(texts)}, D)")
    adv, _ = soft_step_advantage(step_return, b.group, text_code, unit_rows(feats), cfg.temperature)
    return adv


def run_pipeline(inputs: AdvantageInputs, cfg: AdvantageConfig, *, modulate: bool, step: str) -> AdvantageOutputs:
    """The shared stages: returns -> episode term (-> modulation) -> step term -> combine.

    step: "none" | "exact" | "similarity" | "soft".
    """
    beta = _check_cfg(cfg)
    b = prepare(inputs)
    score = apply_invalid_penalty(b.episode_reward, b.valid, cfg.invalid_penalty)
    step_return = apply_invalid_penalty(discounted_returns(b.traj, b.step, b.reward, cfg.gamma),
                                        b.valid, cfg.invalid_penalty)
    ep_adv = episode_advantage(score, b.group, b.n_groups, b.traj, b.n_traj, b.traj_group,
                               cfg.norm_by_std, cfg.stats_over)
    p, row_success = success_rate(score, b.episode_reward, b.success, b.group, b.n_groups, b.traj, b.n_traj,
                                  b.traj_group, cfg.success_threshold, cfg.reference_success_rate)
    p_row = p[b.group]
    weight = modulation_weight(p_row, row_success, cfg.alpha, beta) if modulate else np.ones_like(ep_adv)
    ep_adv = weight * ep_adv
    if step == "none":
        st_adv = np.zeros_like(ep_adv)
    elif step in ("exact", "similarity"):
        if step == "exact":
            bucket, n_buckets = exact_buckets(b.group, b.anchor)
        else:
            texts = [anchor_text(a) for a in b.anchor_values]
            bucket, n_buckets = similarity_buckets(b.group, b.anchor, texts, cfg.similarity_threshold)
        st_adv = step_advantage_buckets(step_return, bucket, n_buckets, cfg.norm_by_std)
    elif step == "soft":
        st_adv = _soft_step(b, step_return, cfg)
    else:
        raise ValueError(f"unknown step grouping {step!r}")
    adv = ep_adv + cfg.step_weight * st_adv
    extras = {
        "episode_adv": b.scatter(ep_adv),
        "step_adv": b.scatter(st_adv),
        "episode_score": b.scatter(score),
        "step_return": b.scatter(step_return),
        "modulation_weight": b.scatter(weight),
        "success_rate": b.scatter(p_row),
        "success": b.scatter(row_success.astype(np.float64)),
    }
    return AdvantageOutputs(advantages=b.scatter(adv), returns=extras["step_return"].copy(), extras=extras)


def _builtin(name: str, modulate: bool, step: str) -> None:
    def estimator(inputs: AdvantageInputs, cfg: AdvantageConfig) -> AdvantageOutputs:
        return run_pipeline(inputs, cfg, modulate=modulate, step=step)

    estimator.__name__ = f"estimate_{name}"
    estimator.__doc__ = f"Built-in estimator {name!r}: modulation={modulate}, step grouping={step}."
    register_estimator(name, estimator)


for _name, _mod, _step in (
    ("grpo", False, "none"),
    ("gigpo", False, "exact"),
    ("gigpo_similarity", False, "similarity"),
    ("proxmo", True, "soft"),
    ("proxmo_modulation_only", True, "exact"),
    ("proxmo_soft_only", False, "soft"),
):
    _builtin(_name, _mod, _step)

__all__ = ["beta_from_range", "compute_advantages", "get_estimator", "list_estimators", "register_estimator"]
