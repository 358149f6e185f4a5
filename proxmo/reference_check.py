"""Check our estimators against the authors' numbers: ``python -m proxmo.reference_check FILE [--repeat K]``.

FILE has the layout of ``proxmo_reference_v1.json``: ``batches`` (each a ``seed`` and
``rows`` with group/traj/step/obs/valid/reward/episode_reward) and ``cases`` (each a
``batch``, a ``config`` in the reference's vocabulary and optionally ``expected``
per-row outputs). Each case runs in reference-compatible mode (p = clip(mean row score,
0, 1), statistics over rows) and prints ``NAME seed=S max_abs_err=E ms=T``; the last line
is ``N passed, M failed``. ``ms`` is the best of K runs of compute_advantages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from proxmo.batch import AdvantageInputs
from proxmo.config import AdvantageConfig
from proxmo.estimators import compute_advantages

TOLERANCE = 1e-4

# reference "mode" -> (norm_by_std, soft step baseline)
_MODES = {"mean_std_norm": (True, False), "mean_norm": (False, False), "soft_grouping": (False, True)}
# reference config keys that map one to one onto AdvantageConfig fields
_SAME_KEYS = {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "step_weight": "step_weight",
              "invalid_penalty": "invalid_penalty", "temperature": "temperature",
              "tfidf_max_features": "tfidf_max_features", "similarity_thresh": "similarity_threshold",
              "similarity_threshold": "similarity_threshold", "target_range": "target_range"}
_IGNORED_KEYS = {"name", "mode", "modulation", "enable_similarity", "description"}
# expected output name -> our extras key ("advantage" is the combined advantage)
_OUTPUTS = {"episode_score": "episode_score", "step_return": "step_return", "episode_adv": "episode_adv",
            "step_adv": "step_adv", "advantage": "advantages", "advantages": "advantages",
            "modulation_weight": "modulation_weight", "success_rate": "success_rate", "returns": "step_return"}


def config_from_reference(ref: dict[str, Any]) -> AdvantageConfig:
    """Map a reference config dict onto AdvantageConfig in reference-compatible mode."""
    unknown = set(ref) - set(_SAME_KEYS) - _IGNORED_KEYS
    if unknown:
        raise ValueError(f"unsupported config key(s) {sorted(unknown)}")
    mode = ref.get("mode", "mean_norm")
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(_MODES)}")
    norm, soft = _MODES[mode]
    modulation = bool(ref.get("modulation", False))
    similarity = bool(ref.get("enable_similarity", False))
    if soft and similarity:
        raise ValueError("enable_similarity has no meaning with soft_grouping")
    if soft:
        estimator = "proxmo" if modulation else "proxmo_soft_only"
    elif modulation:
        if similarity:
            raise ValueError("modulation with similarity buckets has no built-in estimator")
        estimator = "proxmo_modulation_only"
    else:
        estimator = "gigpo_similarity" if similarity else "gigpo"
    kwargs = {field: ref[key] for key, field in _SAME_KEYS.items() if key in ref}
    cfg = AdvantageConfig(estimator=estimator, norm_by_std=norm, stats_over="rows", reference_success_rate=True)
    return replace(cfg, **kwargs)


def inputs_from_rows(rows: list[dict[str, Any]]) -> AdvantageInputs:
    def col(key: str) -> list[Any]:
        try:
            return [r[key] for r in rows]
        except KeyError:
            raise ValueError(f"a row lacks {key!r}") from None

    return AdvantageInputs(group=col("group"), traj=col("traj"), step=col("step"), reward=col("reward"),
                           valid=col("valid"), anchor=col("obs"),
                           episode_reward=col("episode_reward") if all("episode_reward" in r for r in rows) else None)


def _find_batch(batches: list[dict[str, Any]], ref: Any) -> dict[str, Any]:
    for b in batches:
        if b.get("seed") == ref or b.get("name") == ref:
            return b
    if isinstance(ref, int) and 0 <= ref < len(batches):
        return batches[ref]
    raise ValueError(f"case names batch {ref!r}, which matches no batch seed or index")


def run_case(case: dict[str, Any], batches: list[dict[str, Any]], repeat: int) -> tuple[str, bool]:
    """One output line and whether the case passed."""
    ref_cfg = case.get("config", {})
    name = ref_cfg.get("name") or case.get("name") or "case"
    try:
        batch = {"rows": case["rows"], "seed": case.get("seed")} if "rows" in case else _find_batch(batches, case.get("batch"))
        seed = batch.get("seed", case.get("batch"))
        cfg = config_from_reference(ref_cfg)
        inputs = inputs_from_rows(batch["rows"])
        best = math.inf
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            out = compute_advantages(inputs, cfg)
            best = min(best, time.perf_counter() - t0)
    except (ValueError, KeyError, TypeError) as exc:
        return f"{name} seed={case.get('batch')} error={exc}", False
    line = f"{name} seed={seed}"
    ok = True
    expected = case.get("expected")
    if expected:
        worst = 0.0
        for key, values in expected.items():
            ours_key = _OUTPUTS.get(key)
            if ours_key is None:
                return f"{line} error=unknown expected output {key!r}", False
            ours = out.advantages if ours_key == "advantages" else out.extras[ours_key]
            want = np.asarray(values, dtype=np.float64)
            if want.shape != ours.shape:
                return f"{line} error={key} has {want.shape[0]} values for {ours.shape[0]} rows", False
            err = float(np.max(np.abs(ours.astype(np.float64) - want))) if want.size else 0.0
            if not math.isfinite(err):
                err = math.inf
            worst = max(worst, err)
        ok = worst <= TOLERANCE
        line += f" max_abs_err={worst:.3g}"
    return f"{line} ms={best * 1e3:.2f}", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxmo.reference_check", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="reference JSON (proxmo_reference_v1.json layout)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; ms is the best")
    args = parser.parse_args(argv)
    with open(args.file, encoding="utf-8") as fh:
        data = json.load(fh)
    batches = data.get("batches", [])
    passed = failed = 0
    for case in data.get("cases", []):
        line, ok = run_case(case, batches, args.repeat)
        print(line, flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
