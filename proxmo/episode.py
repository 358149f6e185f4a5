"""Episode-level group advantage and success-rate-aware modulation (ProxMO Sec. 4.1).

A_E = S - mean_g(S)   or   (S - mean_g(S)) / (std_g(S) + eps)     (GRPO / GiGPO episode term)
w   = 1 + beta * (sigmoid((1 - p)^alpha) - 1/2)   for successful rows
w   = 1 + beta * (sigmoid(-(p^alpha)) - 1/2)      for failed rows
A_E <- w * A_E

Departures from the paper / reference code (both documented in AdvantageConfig):
- Default p is the true fraction of successful *trajectories* in the group (success
  given per row, else episode_reward > success_threshold). The reference code uses
  p = clip(mean over the group's step rows of the penalised episode score, 0, 1), which
  saturates at 1 as soon as one episode earns 10; that is ``reference_success_rate``.
- In the default mode a row's success is its trajectory's success; in reference mode it is
  ``episode_score > success_threshold`` per row (an invalid step of a winning episode
  with reward 0.5 < R <= 0.6 would flip, as in the reference).
- ``stats_over="trajectories"`` takes mean/std over one score per trajectory (the mean of
  its rows' penalised scores) instead of over step rows.
Statistics: unbiased std (torch.std convention); a group with a single element uses
mean 0 and std 1 (reference rule), so its A_E is the score itself.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-6


def group_mean_std(values: np.ndarray, codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-code count, mean and unbiased std (two-pass, float64). Shapes [n_codes]."""
    cnt = np.bincount(codes, minlength=n_codes)
    mean = np.bincount(codes, weights=values, minlength=n_codes) / np.maximum(cnt, 1)
    dev = values - mean[codes]
    var = np.bincount(codes, weights=dev * dev, minlength=n_codes) / np.maximum(cnt - 1, 1)
    return cnt, mean, np.sqrt(var)


def episode_advantage(score: np.ndarray, group: np.ndarray, n_groups: int, traj: np.ndarray, n_traj: int,
                      traj_group: np.ndarray, norm_by_std: bool, stats_over: str) -> np.ndarray:
    """A_E per row [N] from the penalised episode score S [N]."""
    if stats_over == "rows":
        cnt, mean, std = group_mean_std(score, group, n_groups)
    elif stats_over == "trajectories":
        t_cnt = np.bincount(traj, minlength=n_traj)
        t_score = np.bincount(traj, weights=score, minlength=n_traj) / np.maximum(t_cnt, 1)
        cnt, mean, std = group_mean_std(t_score, traj_group, n_groups)
    else:
        raise ValueError(f"stats_over must be 'rows' or 'trajectories', got {stats_over!r}")
    single = cnt <= 1
    mean = np.where(single, 0.0, mean)
    std = np.where(single, 1.0, std)
    adv = score - mean[group]
    if norm_by_std:
        adv = adv / (std[group] + EPS)
    return adv


def success_rate(score: np.ndarray, episode_reward: np.ndarray, success: np.ndarray | None,
                 group: np.ndarray, n_groups: int, traj: np.ndarray, n_traj: int, traj_group: np.ndarray,
                 threshold: float, reference: bool) -> tuple[np.ndarray, np.ndarray]:
    """(p per group [G], success per row [N] bool)."""
    if reference:
        _, mean, _ = group_mean_std(score, group, n_groups)
        return np.clip(mean, 0.0, 1.0), score > threshold
    if success is None:
        row_success = episode_reward > threshold
    else:
        row_success = success
    # a trajectory succeeded if any of its rows says so (rows normally agree)
    t_success = np.bincount(traj, weights=row_success.astype(np.float64), minlength=n_traj) > 0
    g_cnt = np.bincount(traj_group, minlength=n_groups)
    p = np.bincount(traj_group, weights=t_success.astype(np.float64), minlength=n_groups) / np.maximum(g_cnt, 1)
    return p, t_success[traj]


def modulation_weight(p_row: np.ndarray, success_row: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """w per row: boosts successes in hard groups (low p), damps failures in easy groups (high p)."""
    sig_pos = 1.0 / (1.0 + np.exp(-((1.0 - p_row) ** alpha)))
    sig_neg = 1.0 / (1.0 + np.exp(p_row ** alpha))
    return 1.0 + beta * (np.where(success_row, sig_pos, sig_neg) - 0.5)


def beta_from_range(target_range: float) -> float:
    """beta such that the largest boost 1 + beta*(sigmoid(1) - 1/2) equals 1 + target_range."""
    return target_range / (1.0 / (1.0 + math.exp(-1.0)) - 0.5)
