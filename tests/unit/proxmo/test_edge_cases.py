"""Invariances (row order, group order, split into micro-batches) and edge cases / bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from proxmo import AdvantageConfig, AdvantageInputs, compute_advantages, list_estimators, register_estimator
from proxmo.synthetic import make_batch

ESTIMATORS = ["grpo", "gigpo", "gigpo_similarity", "proxmo", "proxmo_modulation_only", "proxmo_soft_only"]


@pytest.fixture(scope="module")
def batch():
    return make_batch(n_groups=5, group_size=4, max_steps=10, seed=21)


def take(inp: AdvantageInputs, idx) -> AdvantageInputs:
    cols = {f.name: getattr(inp, f.name) for f in dataclasses.fields(inp)}
    return AdvantageInputs(**{k: None if v is None else [v[i] for i in idx] for k, v in cols.items()})


def make(rows, **kw) -> AdvantageInputs:
    """rows: (group, traj, step, anchor, reward, valid)."""
    g, t, s, a, r, v = (list(c) for c in zip(*rows, strict=True))
    return AdvantageInputs(group=g, traj=t, step=s, anchor=a, reward=r, valid=v, **kw)


def test_registry_lists_builtins_and_rejects_duplicates():
    assert set(ESTIMATORS) <= set(list_estimators())
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("gigpo", lambda inputs, cfg: None)


def test_unknown_estimator_lists_known_names(batch):
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'.*gigpo.*grpo.*proxmo"):
        compute_advantages(batch.to_inputs(), AdvantageConfig(estimator="ppo"))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_row_order_invariance(batch, estimator):
    cfg = AdvantageConfig(estimator=estimator)
    inp = batch.to_inputs()
    ref = compute_advantages(inp, cfg)
    perm = np.random.default_rng(0).permutation(len(batch))
    out = compute_advantages(take(inp, perm), cfg)
    np.testing.assert_allclose(out.advantages, ref.advantages[perm], atol=1e-5)
    for key in ref.extras:
        np.testing.assert_allclose(out.extras[key], ref.extras[key][perm], atol=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_group_order_and_label_invariance(batch, estimator):
    cfg = AdvantageConfig(estimator=estimator)
    inp = batch.to_inputs()
    ref = compute_advantages(inp, cfg)
    groups = list(dict.fromkeys(batch.group))[::-1]
    idx = [i for g in groups for i in range(len(batch)) if batch.group[i] == g]
    moved = take(inp, idx)
    relabeled = dataclasses.replace(moved, group=[("task", g[::-1]) for g in moved.group])  # tuple ids
    out = compute_advantages(relabeled, cfg)
    np.testing.assert_allclose(out.advantages, ref.advantages[idx], atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "gigpo", "gigpo_similarity", "proxmo_modulation_only"])
def test_micro_batch_split_invariance(batch, estimator):
    # estimators whose statistics never leave a group give the same numbers group by group
    cfg = AdvantageConfig(estimator=estimator)
    inp = batch.to_inputs()
    ref = compute_advantages(inp, cfg)
    for g in set(batch.group):
        idx = [i for i in range(len(batch)) if batch.group[i] == g]
        np.testing.assert_allclose(compute_advantages(take(inp, idx), cfg).advantages, ref.advantages[idx], atol=1e-5)


def test_mask_excludes_rows_from_every_statistic(batch):
    inp = batch.to_inputs()
    n = len(batch)
    mask = np.ones(n, dtype=bool)
    mask[::7] = False
    reward = list(inp.reward)
    reward[0] = float("nan")  # an infrastructure failure may carry no reward at all
    masked = dataclasses.replace(inp, mask=mask.tolist(), reward=reward)
    keep = np.flatnonzero(mask)
    for est in ESTIMATORS:
        cfg = AdvantageConfig(estimator=est)
        out = compute_advantages(masked, cfg)
        ref = compute_advantages(take(inp, keep), cfg)
        np.testing.assert_allclose(out.advantages[keep], ref.advantages, atol=1e-5)
        assert np.all(out.advantages[~mask] == 0) and all(np.all(v[~mask] == 0) for v in out.extras.values())


def test_all_rows_masked_gives_zeros(batch):
    out = compute_advantages(dataclasses.replace(batch.to_inputs(), mask=[False] * len(batch)), AdvantageConfig())
    assert out.advantages.shape == (len(batch),) and not np.any(out.advantages)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_singleton_group_and_states(estimator):
    # a group of one row: mean 0 / std 1 for the episode term (A_E = S), step term 0
    out = compute_advantages(make([("g", "t", 0, "only state", 10.0, 1)]), AdvantageConfig(estimator=estimator))
    w = out.extras["modulation_weight"][0]  # p = 1, success: w = 1
    assert w == pytest.approx(1.0)
    assert out.extras["episode_adv"][0] == pytest.approx(10.0)
    assert out.extras["step_adv"][0] == pytest.approx(0.0, abs=1e-6)
    # distinct states everywhere: every exact bucket is a singleton
    rows = [("g", f"t{i}", 0, f"state number {i}", float(i), 1) for i in range(3)]
    out = compute_advantages(make(rows), AdvantageConfig(estimator=estimator))
    if estimator in ("gigpo", "gigpo_similarity", "proxmo_modulation_only"):
        assert np.all(out.extras["step_adv"] == 0)


@pytest.mark.parametrize("won", [True, False])
def test_all_success_and_all_failure_groups(won):
    r = 10.0 if won else 0.0
    rows = [("g", f"t{i}", s, f"room {s}", r if s == 1 else 0.0, 1) for i in range(3) for s in range(2)]
    out = compute_advantages(make(rows), AdvantageConfig(estimator="proxmo", alpha=4.0, beta=1.0))
    p = out.extras["success_rate"]
    assert np.all(p == (1.0 if won else 0.0))
    # p = 1 and success: sigmoid(0); p = 0 and failure: sigmoid(-0): both give w = 1
    np.testing.assert_allclose(out.extras["modulation_weight"], 1.0)
    np.testing.assert_allclose(out.extras["episode_adv"], 0.0, atol=1e-6)


@pytest.mark.parametrize("anchors", [["", "", "", ""], ["a", "b", "a b", "I"], ["", "go north", "", "go north"]])
def test_empty_and_one_char_texts_fall_back(anchors):
    # no token survives TF-IDF's token pattern -> zero features -> uniform weights -> group mean
    rows = [("g", f"t{i}", 0, a, float(i), 1) for i, a in enumerate(anchors)]
    out = compute_advantages(make(rows), AdvantageConfig(estimator="proxmo_soft_only"))
    assert np.all(np.isfinite(out.advantages))
    if all(len(t) <= 1 or t == "a b" for t in anchors):
        np.testing.assert_allclose(out.extras["step_adv"], np.arange(4) - 1.5, atol=1e-5)


def test_non_string_anchors():
    anchors = [("room", 1), ("room", 1), {"loc": 2, "inv": ["key"]}, {"inv": ["key"], "loc": 2}, [1, 2], [1, 2]]
    rows = [("g", f"t{i}", 0, a, float(i), 1) for i, a in enumerate(anchors)]
    out = compute_advantages(make(rows), AdvantageConfig(estimator="gigpo"))
    # equal tuples / dicts (any key order) / lists share a bucket: +-0.5 around each pair's mean
    np.testing.assert_allclose(out.extras["step_adv"], [-0.5, 0.5] * 3)
    for est in ("proxmo", "gigpo_similarity"):
        assert np.all(np.isfinite(compute_advantages(make(rows), AdvantageConfig(estimator=est)).advantages))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_rejected(bad):
    with pytest.raises(ValueError, match="non-finite"):
        compute_advantages(make([("g", "t", 0, "s", bad, 1)]), AdvantageConfig())


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="empty batch"):
        compute_advantages(AdvantageInputs([], [], [], [], [], []), AdvantageConfig())
    inp = make([("g", "t", 0, "s", 1.0, 1), ("g", "t", 1, "s", 1.0, 1)])
    with pytest.raises(ValueError, match="mismatched lengths: anchor"):
        compute_advantages(dataclasses.replace(inp, anchor=["s"]), AdvantageConfig())
    with pytest.raises(ValueError, match="duplicate step"):
        compute_advantages(dataclasses.replace(inp, step=[0, 0]), AdvantageConfig())
    with pytest.raises(ValueError, match="more than one group"):
        compute_advantages(dataclasses.replace(inp, group=["g", "h"]), AdvantageConfig())
    with pytest.raises(ValueError, match="valid must hold 0/1"):
        compute_advantages(dataclasses.replace(inp, valid=[1, 2]), AdvantageConfig())
    with pytest.raises(ValueError, match="temperature"):
        compute_advantages(inp, AdvantageConfig(temperature=0.0))


def test_gap_in_steps_discounts_by_position():
    # steps 0 and 5 (rows in between masked upstream): G_0 = 0 + 0.5 * 10
    out = compute_advantages(make([("g", "t", 5, "b", 10.0, 1), ("g", "t", 0, "a", 0.0, 1)]),
                             AdvantageConfig(estimator="grpo", gamma=0.5))
    np.testing.assert_allclose(out.returns, [10.0, 5.0])


def test_large_group_memory_follows_distinct_states():
    # 20k rows in one group but only 30 distinct states: the soft baseline needs a 30 x 30 matrix
    n = 20_000
    rows = [("g", f"t{i // 50}", i % 50, f"state {i % 30} here", float(i % 2), 1) for i in range(n)]
    out = compute_advantages(make(rows), AdvantageConfig(estimator="proxmo_soft_only"))
    assert out.advantages.shape == (n,) and np.all(np.isfinite(out.advantages))


def dense_tfidf(texts, counts, cfg):
    """The TF-IDF features as a dense array: forces the per-group dense Gram path."""
    from proxmo.proximity import tfidf_features

    f = tfidf_features(texts, counts, cfg.tfidf_max_features)
    return f if isinstance(f, np.ndarray) else f.toarray()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 1e-3])
def test_sparse_and_dense_soft_paths_agree(batch, temperature):
    inp = batch.to_inputs()
    sparse = compute_advantages(inp, AdvantageConfig(estimator="proxmo", temperature=temperature))
    dense = compute_advantages(inp, AdvantageConfig(estimator="proxmo", temperature=temperature,
                                                    featurizer="tests.unit.proxmo.test_edge_cases:dense_tfidf"))
    assert np.all(np.isfinite(sparse.advantages))  # tau 1e-3: logits up to 1000, no overflow
    np.testing.assert_allclose(sparse.advantages, dense.advantages, atol=1e-5)


def test_featurizer_with_wrong_shape_is_rejected(batch):
    with pytest.raises(ValueError, match="returned shape"):
        compute_advantages(batch.to_inputs(), AdvantageConfig(
            estimator="proxmo", featurizer="tests.unit.proxmo.test_edge_cases:bad_featurizer"))


def bad_featurizer(texts, counts, cfg):
    return np.ones((len(texts) + 1, 3))
