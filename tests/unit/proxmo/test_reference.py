"""The fast estimators against the authors' numbers (golden file) and against a naive
re-statement of the same semantics on batches the golden file does not contain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from proxmo import compute_advantages
from proxmo.proximity import tfidf_features, tfidf_fit
from proxmo.reference_check import TOLERANCE, config_from_reference, inputs_from_rows, run_case
from proxmo.synthetic import make_batch
from tests.unit.proxmo.naive import naive_reference

GOLDEN = Path(__file__).resolve().parents[4] / "shared" / "golden" / "proxmo_reference_v1.json"
if not GOLDEN.exists():
    GOLDEN = Path("/work/shared/golden/proxmo_reference_v1.json")
BETA = 0.05 / (1 / (1 + np.exp(-1.0)) - 0.5)


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"golden file not found at {GOLDEN}")
    return json.loads(GOLDEN.read_text())


def test_all_golden_cases_pass(golden):
    assert len(golden["cases"]) == 18
    for case in golden["cases"]:
        line, ok = run_case(case, golden["batches"], repeat=1)
        assert ok, line


def test_golden_case_error_is_reported_not_hidden(golden):
    case = json.loads(json.dumps(golden["cases"][0]))
    case["expected"]["advantage"][5] += 1e-3  # one value off by 10x the tolerance
    line, ok = run_case(case, golden["batches"], repeat=1)
    assert not ok and "max_abs_err=0.001" in line


@pytest.mark.parametrize("max_features", [1024, 40, 7])
def test_tfidf_from_distinct_texts_equals_plain_fit(golden, max_features):
    """Fitting once per distinct text with multiplicities must give the plain fit's numbers."""
    for texts in ([r["obs"] for r in golden["batches"][0]["rows"]], make_batch(4, 4, 20, seed=3).anchor):
        uniq, inv, counts = np.unique(np.asarray(texts, dtype=object), return_inverse=True, return_counts=True)
        vec = TfidfVectorizer(max_features=max_features)
        plain = vec.fit_transform(texts).toarray()
        terms, idf, _ = tfidf_fit(list(uniq), counts, max_features)
        assert list(terms) == list(vec.get_feature_names_out())
        np.testing.assert_array_equal(idf, vec.idf_)  # bit for bit
        ours = tfidf_features(list(uniq), counts, max_features).toarray()
        np.testing.assert_allclose(ours[inv.reshape(-1)], plain, rtol=0, atol=1e-15)  # summation order only


CONFIGS = [
    {"mode": "mean_std_norm", "modulation": False},
    {"mode": "mean_norm", "modulation": True},
    {"mode": "soft_grouping", "modulation": False},
    {"mode": "soft_grouping", "modulation": True, "alpha": 5.0, "beta": 0.866, "temperature": 0.3,
     "gamma": 0.9, "step_weight": 0.5, "invalid_penalty": 0.2, "tfidf_max_features": 64},
]


@pytest.mark.parametrize("ref_cfg", CONFIGS)
def test_fast_matches_naive_on_unseen_batches(ref_cfg):
    full = {"alpha": 4.0, "beta": BETA, "gamma": 0.95, "step_weight": 1.0, "invalid_penalty": 0.1,
            "temperature": 0.1, "tfidf_max_features": 1024, **ref_cfg}
    for seed in (11, 12):
        rows = make_batch(n_groups=3, group_size=4, max_steps=12, seed=seed).rows()
        want = naive_reference(rows, **full)
        out = compute_advantages(inputs_from_rows(rows), config_from_reference(full))
        for key, values in want.items():
            ours = out.advantages if key == "advantage" else out.extras[key]
            assert np.max(np.abs(ours - values)) <= TOLERANCE, (key, seed)


def test_reference_check_cli_on_generated_file(tmp_path):
    """The command on a file we generate: pass with the naive expectations, fail when one is off."""
    rows = make_batch(n_groups=2, group_size=3, max_steps=8, seed=5).rows()
    cfg = {"name": "soft_mod", "mode": "soft_grouping", "modulation": True, "alpha": 4.0, "beta": BETA,
           "gamma": 0.95, "step_weight": 1.0, "invalid_penalty": 0.1, "temperature": 0.1, "tfidf_max_features": 1024}
    want = naive_reference(rows, **{k: v for k, v in cfg.items() if k != "name"})
    cases = [{"batch": 7, "config": cfg, "expected": {k: v.tolist() for k, v in want.items()}},
             {"batch": 7, "config": {**cfg, "name": "no_expected"}}]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"batches": [{"seed": 7, "rows": rows}], "cases": cases}))
    res = subprocess.run([sys.executable, "-m", "proxmo.reference_check", str(path), "--repeat", "2"],
                         capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0, res.stdout + res.stderr
    assert lines[0].startswith("soft_mod seed=7 max_abs_err=") and " ms=" in lines[0]
    assert lines[1].startswith("no_expected seed=7 ms=")
    assert lines[-1] == "2 passed, 0 failed"
    cases[0]["expected"]["step_adv"][0] += 0.01
    path.write_text(json.dumps({"batches": [{"seed": 7, "rows": rows}], "cases": cases}))
    res = subprocess.run([sys.executable, "-m", "proxmo.reference_check", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout.strip().splitlines()[-1] == "1 passed, 1 failed"
