"""Estimator inputs/outputs and the one place where raw rows are checked and indexed.

Rows arrive as plain Python sequences (group ids, trajectory ids and anchors are
arbitrary hashable or JSON-able values). Every estimator works on integer codes,
so they are computed once here, after validation, and shared by all stages.

Rows with ``mask=False`` (infrastructure failures) are removed before any
statistic and get advantage 0 and all extras 0; their rewards may be NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_JSON_KEY = object()  # tags anchors that are not hashable and were keyed by their JSON text


@dataclass(frozen=True)
class AdvantageInputs:
    """One row per (trajectory, step); every per-row sequence has the same length N.

    group: episode-group id (same task, same seed), any hashable value.
    traj: trajectory id, hashable, unique across groups.
    step: step index inside the trajectory (order of the discounted return).
    reward: step reward r_t.
    valid: 1/True if the action parsed, 0/False if it was invalid (penalised).
    anchor: the state the action was taken in (observation text or any
        hashable / JSON-able value); used for step grouping.
    episode_reward: R of the row's episode; default: sum of the trajectory's rewards.
    success: true trajectory success per row (default p and success rows); default:
        episode_reward > success_threshold.
    mask: False marks an infrastructure-failure row: excluded and given advantage 0.
    """

    group: Sequence[Any]
    traj: Sequence[Any]
    step: Sequence[int]
    reward: Sequence[float]
    valid: Sequence[Any]
    anchor: Sequence[Any]
    episode_reward: Sequence[float] | None = None
    success: Sequence[bool] | None = None
    mask: Sequence[bool] | None = None

    def __len__(self) -> int:
        return len(self.reward)


@dataclass
class AdvantageOutputs:
    """advantages: float32 [N] (A = w * A_E + omega * A_S); returns: float32 [N] the
    penalised discounted step return G~; extras: named float32 [N] terms."""

    advantages: np.ndarray
    returns: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def factorize(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Integer codes in order of first appearance (hashable values only)."""
    table: dict[Any, int] = {}
    try:
        codes = [table.setdefault(v, len(table)) for v in values]
    except TypeError as exc:
        raise ValueError(f"ids must be hashable: {exc}") from None
    return np.asarray(codes, dtype=np.int64).reshape(-1), list(table)


def anchor_key(anchor: Any) -> Any:
    """Exact-match key: the anchor itself when hashable, else its canonical JSON."""
    try:
        hash(anchor)
        return anchor
    except TypeError:
        pass
    try:
        return (_JSON_KEY, json.dumps(anchor, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"anchor {anchor!r:.80} is neither hashable nor JSON-able: {exc}") from None


def anchor_text(anchor: Any) -> str:
    """Text used by similarity and proximity featurizers for a (unique) anchor."""
    if isinstance(anchor, str):
        return anchor
    if isinstance(anchor, tuple) and len(anchor) == 2 and anchor[0] is _JSON_KEY:
        return anchor[1]
    try:
        return json.dumps(anchor, sort_keys=True)
    except (TypeError, ValueError):
        return str(anchor)


@dataclass
class Batch:
    """Validated, integer-coded active rows (mask True), float64 numbers."""

    n_total: int
    active: np.ndarray  # [n] indices of active rows into the caller's rows
    group: np.ndarray  # [n] group code
    n_groups: int
    traj: np.ndarray  # [n] trajectory code
    n_traj: int
    traj_group: np.ndarray  # [n_traj] group code of each trajectory
    step: np.ndarray  # [n] int64
    reward: np.ndarray  # [n] float64
    valid: np.ndarray  # [n] float64 in {0, 1}
    episode_reward: np.ndarray  # [n] float64
    success: np.ndarray | None  # [n] bool or None
    anchor: np.ndarray  # [n] anchor code (exact-match classes)
    anchor_values: list[Any]  # unique anchor keys, indexed by code

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """Active-row values back to all N rows as float32, masked rows 0."""
        out = np.zeros(self.n_total, dtype=np.float32)
        out[self.active] = values
        return out


def _float_column(name: str, values: Sequence[float], n: int) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers: {exc}") from None
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a flat sequence of length {n}, got shape {arr.shape}")
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} non-finite value(s) (NaN/inf), first at row {int(bad[0])}: "
                         f"{arr[bad[0]]!r}; mark infrastructure failures with mask=False instead")


def _bool_column(name: str, values: Sequence[Any], n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a flat sequence of length {n}, got shape {arr.shape}")
    if arr.dtype != bool:
        try:
            num = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must hold 0/1 or booleans") from None
        if not np.all((num == 0) | (num == 1)):
            raise ValueError(f"{name} must hold 0/1 or booleans, got {sorted(set(num[(num != 0) & (num != 1)].tolist()))[:5]}")
        arr = num == 1
    return arr


def prepare(inputs: AdvantageInputs) -> Batch:
    """Check lengths and values, drop masked rows, and code ids; raise ValueError on bad input."""
    n = len(inputs.reward)
    if n == 0:
        raise ValueError("empty batch: AdvantageInputs has no rows")
    for name in ("group", "traj", "step", "valid", "anchor", "episode_reward", "success", "mask"):
        col = getattr(inputs, name)
        if col is not None and len(col) != n:
            raise ValueError(f"mismatched lengths: {name} has {len(col)} rows, reward has {n}")
    mask = np.ones(n, dtype=bool) if inputs.mask is None else _bool_column("mask", inputs.mask, n)
    active = np.flatnonzero(mask)
    reward = _float_column("reward", inputs.reward, n)[active]
    _check_finite("reward", reward)
    steps = np.asarray(inputs.step)
    if steps.shape != (n,) or not (np.issubdtype(steps.dtype, np.integer) or steps.dtype == bool):
        if steps.shape == (n,) and np.issubdtype(steps.dtype, np.floating) and np.all(steps == np.round(steps)):
            steps = steps.astype(np.int64)
        else:
            raise ValueError(f"step must be a flat sequence of {n} integers, got dtype {steps.dtype} shape {steps.shape}")
    valid = _bool_column("valid", inputs.valid, n)[active].astype(np.float64)
    sel = active.tolist()
    group, _ = factorize([inputs.group[i] for i in sel])
    traj, _ = factorize([inputs.traj[i] for i in sel])
    n_traj = int(traj.max()) + 1 if traj.size else 0
    traj_group = np.full(n_traj, -1, dtype=np.int64)
    traj_group[traj] = group
    if traj.size and np.any(traj_group[traj] != group):
        bad = int(np.flatnonzero(traj_group[traj] != group)[0])
        raise ValueError(f"trajectory {inputs.traj[sel[bad]]!r} appears in more than one group")
    anchor, anchor_values = factorize([anchor_key(inputs.anchor[i]) for i in sel])
    success = None
    if inputs.success is not None:
        success = _bool_column("success", inputs.success, n)[active]
    if inputs.episode_reward is not None:
        episode_reward = _float_column("episode_reward", inputs.episode_reward, n)[active]
        _check_finite("episode_reward", episode_reward)
    else:
        episode_reward = np.bincount(traj, weights=reward, minlength=n_traj)[traj]
    return Batch(n_total=n, active=active, group=group, n_groups=int(group.max()) + 1 if group.size else 0,
                 traj=traj, n_traj=n_traj, traj_group=traj_group, step=steps[active].astype(np.int64),
                 reward=reward, valid=valid, episode_reward=episode_reward, success=success,
                 anchor=anchor, anchor_values=anchor_values)


def check_config_numbers(**values: float) -> None:
    """Reject NaN/inf hyper-parameters early with their names."""
    for name, v in values.items():
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"config {name} must be a finite number, got {v!r}")
