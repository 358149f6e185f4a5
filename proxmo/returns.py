"""Discounted step returns and the invalid-action penalty (paper Sec. 3, GiGPO eq. for G_t).

Departures from the reference code:
- The reference walks each trajectory in a Python loop; we run one vectorized pass per
  step position (O(max steps) numpy operations, O(N) memory).
- Steps are ordered by ``step`` and discounted by position in that order, so gaps in the
  step numbers (e.g. after masked rows) do not add extra discount. Duplicate
  (trajectory, step) pairs are an error.
"""

from __future__ import annotations

import numpy as np


def discounted_returns(traj: np.ndarray, step: np.ndarray, reward: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k-t) r_k within each trajectory.

    traj: int codes [N]; step: int [N]; reward: float [N]. Returns float64 [N] in row order.
    """
    n = reward.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.lexsort((step, traj))
    t_sorted, s_sorted = traj[order], step[order]
    same_traj = t_sorted[1:] == t_sorted[:-1]
    dup = same_traj & (s_sorted[1:] == s_sorted[:-1])
    if np.any(dup):
        i = int(np.flatnonzero(dup)[0])
        raise ValueError(f"duplicate step {int(s_sorted[i])} in one trajectory (row {int(order[i])} and {int(order[i + 1])})")
    # position of each sorted row inside its trajectory
    starts = np.flatnonzero(np.concatenate(([True], ~same_traj)))
    run_id = np.cumsum(np.concatenate(([0], (~same_traj).astype(np.int64))))
    pos = np.arange(n) - starts[run_id]
    has_next = np.concatenate((same_traj, [False]))
    r_sorted = reward[order]
    g_sorted = np.zeros(n, dtype=np.float64)
    by_pos = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[by_pos], np.arange(int(pos.max()) + 2))
    for t in range(int(pos.max()), -1, -1):
        rows = by_pos[bounds[t]:bounds[t + 1]]
        nxt = np.where(has_next[rows], rows + 1, rows)  # a trajectory's last row reads itself, masked below
        g_sorted[rows] = r_sorted[rows] + gamma * np.where(has_next[rows], g_sorted[nxt], 0.0)
    out = np.empty(n, dtype=np.float64)
    out[order] = g_sorted
    return out


def apply_invalid_penalty(values: np.ndarray, valid: np.ndarray, penalty: float) -> np.ndarray:
    """x - penalty * (1 - valid): applied to both the episode score and the step return."""
    return values - penalty * (1.0 - valid)
