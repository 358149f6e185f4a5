"""Every estimator on a batch small enough to work on paper: 2 groups x 3 episodes.

gamma = 0.5, invalid penalty 0.1, omega = 1, mean-only statistics over step rows.

Group A (1 of 3 episodes wins, p = 1/3)     Group B (2 of 3 win, p = 2/3)
 a0: "start a" r=0 -> "room x" r=10  (win)    b0: "start b" r=0 -> "room z" r=10  (win)
 a1: "start a" r=0 INVALID -> "room y" r=0    b1: "start b" r=10                  (win)
 a2: "start a" r=0 -> "room x" r=0            b2: "start b" r=0 -> "room z" r=0 INVALID

Step returns G~ (G_t = r_t + 0.5 G_{t+1}, minus 0.1 if invalid):
 a0 [5, 10]  a1 [-0.1, 0]  a2 [0, 0]           b0 [5, 10]  b1 [10]  b2 [0, -0.1]
Episode scores S (R minus 0.1 if the row is invalid):
 a0 [10, 10] a1 [-0.1, 0]  a2 [0, 0]  mean_A = 19.9/6 = 3.316667
 b0 [10, 10] b1 [10]       b2 [0, -0.1]  mean_B = 29.9/5 = 5.98
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from proxmo import AdvantageConfig, AdvantageInputs, compute_advantages

ROWS = [  # group, traj, step, anchor, reward, valid
    ("A", "a0", 0, "start a", 0.0, 1), ("A", "a0", 1, "room x", 10.0, 1),
    ("A", "a1", 0, "start a", 0.0, 0), ("A", "a1", 1, "room y", 0.0, 1),
    ("A", "a2", 0, "start a", 0.0, 1), ("A", "a2", 1, "room x", 0.0, 1),
    ("B", "b0", 0, "start b", 0.0, 1), ("B", "b0", 1, "room z", 10.0, 1),
    ("B", "b1", 0, "start b", 10.0, 1),
    ("B", "b2", 0, "start b", 0.0, 1), ("B", "b2", 1, "room z", 0.0, 0),
]
G_RET = [5, 10, -0.1, 0, 0, 0, 5, 10, 10, 0, -0.1]
SCORE = [10, 10, -0.1, 0, 0, 0, 10, 10, 10, 0, -0.1]
MA, MB = 19.9 / 6, 29.9 / 5
# A_E = S - mean_group
EP = [10 - MA, 10 - MA, -0.1 - MA, -MA, -MA, -MA, 10 - MB, 10 - MB, 10 - MB, -MB, -0.1 - MB]


def inputs() -> AdvantageInputs:
    g, t, s, a, r, v = zip(*ROWS, strict=True)
    return AdvantageInputs(group=list(g), traj=list(t), step=list(s), reward=list(r), valid=list(v), anchor=list(a))


def run(estimator: str, **kw) -> object:
    cfg = AdvantageConfig(estimator=estimator, gamma=0.5, invalid_penalty=0.1, **kw)
    return compute_advantages(inputs(), cfg)


def close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=2e-5)


def test_returns_scores_and_grpo():
    out = run("grpo")
    close(out.returns, G_RET)
    close(out.extras["step_return"], G_RET)
    close(out.extras["episode_score"], SCORE)
    close(out.advantages, EP)  # GRPO: A = A_E, no step term
    close(out.extras["step_adv"], [0.0] * 11)
    close(out.extras["success_rate"], [1 / 3] * 6 + [2 / 3] * 5)


# GiGPO exact buckets, A_S = G~ - mean_bucket:
#  "start a": {5, -0.1, 0} mean 1.633333 -> 3.366667, -1.733333, -1.633333
#  "room x": {10, 0} mean 5 -> 5, -5;  "room y": singleton -> 0
#  "start b": {5, 10, 0} mean 5 -> 0, 5, -5;  "room z": {10, -0.1} mean 4.95 -> 5.05, -5.05
GIGPO_STEP = [5 - 4.9 / 3, 5, -0.1 - 4.9 / 3, 0, -4.9 / 3, -5, 0, 5.05, 5, -5, -5.05]


def test_gigpo():
    out = run("gigpo")
    close(out.extras["step_adv"], GIGPO_STEP)
    close(out.advantages, np.add(EP, GIGPO_STEP))


def test_gigpo_mean_std_norm():
    # "room x" {10, 0}: std (unbiased) = 7.071068 -> +-5/7.071068 = +-0.707107
    # episode group A: std of S over 6 rows = sqrt(sum((S-mean)^2)/5)
    out = run("gigpo", norm_by_std=True)
    std_a = np.std(SCORE[:6], ddof=1)
    close(out.extras["episode_adv"][:6], (np.asarray(SCORE[:6]) - MA) / (std_a + 1e-6))
    close(out.extras["step_adv"][[1, 5]], [0.707107, -0.707107])
    close(out.extras["step_adv"][3], 0.0)  # singleton bucket


# Similarity (difflib ratio): "room x" vs "room y" = 2*5/12 = 0.8333 >= 0.8, "start a" vs rooms 0.31.
# Group A bucket {room x, room y} = {10, 0, 0} mean 3.333333 -> 6.666667, -3.333333, -3.333333
def test_gigpo_similarity():
    out = run("gigpo_similarity", similarity_threshold=0.8)
    step = list(GIGPO_STEP)
    step[1], step[3], step[5] = 10 - 10 / 3, -10 / 3, -10 / 3
    close(out.extras["step_adv"], step)
    close(run("gigpo_similarity", similarity_threshold=0.9).extras["step_adv"], GIGPO_STEP)


# Modulation (alpha 2, beta 1): w_succ = 1 + sigmoid((1-p)^2) - 1/2, w_fail = 1 + sigmoid(-(p^2)) - 1/2
#  A (p = 1/3): w_succ = 0.5 + sigmoid(4/9) = 1.109318, w_fail = 0.5 + sigmoid(-1/9) = 0.972251
#  B (p = 2/3): w_succ = 0.5 + sigmoid(1/9) = 1.027749, w_fail = 0.5 + sigmoid(-4/9) = 0.890682
W = [1.109318, 1.109318, 0.972251, 0.972251, 0.972251, 0.972251, 1.027749, 1.027749, 1.027749, 0.890682, 0.890682]


def test_proxmo_modulation_only():
    out = run("proxmo_modulation_only", alpha=2.0, beta=1.0)
    close(out.extras["modulation_weight"], W)
    close(out.extras["episode_adv"], np.multiply(W, EP))
    close(out.advantages, np.multiply(W, EP) + np.asarray(GIGPO_STEP))


def test_reference_success_rate_saturates():
    # p = clip(mean row score, 0, 1) = 1 in both groups: successes get w = 1 + (sigmoid(0) - 1/2) = 1,
    # failures w = 0.5 + sigmoid(-1) = 0.768941; success rows are those with S > 0.5.
    out = run("proxmo_modulation_only", alpha=2.0, beta=1.0, reference_success_rate=True)
    close(out.extras["success_rate"], [1.0] * 11)
    wf = 0.5 + 1 / (1 + math.e)
    close(out.extras["modulation_weight"], [1, 1, wf, wf, wf, wf, 1, 1, 1, wf, wf])


def onehot(texts, counts, cfg):
    """Test featurizer: one axis per distinct text, so cos is 1 for equal texts and 0 otherwise."""
    return np.eye(len(texts))


# Soft baseline with one-hot states and tau = 1/ln 2: softmax weight 2 for rows with the same
# text (self included), 1 for every other row of the group.
#  "start a": (2*(5-0.1+0) + (10+0+0)) / (2*3+3) = 19.8/9 = 2.2   -> 2.8, -2.3, -2.2
#  "room x":  (2*(10+0) + (5-0.1+0+0)) / (2*2+4) = 24.9/8 = 3.1125 -> 6.8875, -3.1125
#  "room y":  (2*0 + (5+10-0.1+0+0)) / (2+5) = 14.9/7 = 2.128571   -> -2.128571
#  "start b": (2*(5+10+0) + (10-0.1)) / (2*3+2) = 39.9/8 = 4.9875  -> 0.0125, 5.0125, -4.9875
#  "room z":  (2*(10-0.1) + 15) / (2*2+3) = 34.8/7 = 4.971429      -> 5.028571, -5.071429
SOFT_STEP = [2.8, 6.8875, -2.3, -2.128571, -2.2, -3.1125, 0.0125, 5.028571, 5.0125, -4.9875, -5.071429]
ONEHOT = "tests.unit.proxmo.test_handworked:onehot"


def test_proxmo_soft_only():
    out = run("proxmo_soft_only", featurizer=ONEHOT, temperature=1 / math.log(2))
    close(out.extras["step_adv"], SOFT_STEP)
    close(out.advantages, np.add(EP, SOFT_STEP))


def test_proxmo_full():
    out = run("proxmo", featurizer=ONEHOT, temperature=1 / math.log(2), alpha=2.0, beta=1.0, step_weight=0.5)
    close(out.advantages, np.multiply(W, EP) + 0.5 * np.asarray(SOFT_STEP))
    assert set(out.extras) >= {"episode_adv", "step_adv", "episode_score", "step_return", "modulation_weight",
                               "success_rate"}
    assert out.advantages.dtype == np.float32 and out.advantages.shape == (11,)


def test_stats_over_trajectories():
    # trajectory scores (mean of rows): A: 10, -0.05, 0 -> mean 9.95/3 = 3.316667; B: 10, 10, -0.05 -> 6.65
    out = run("grpo", stats_over="trajectories")
    ma, mb = 9.95 / 3, 19.95 / 3
    close(out.advantages, [s - ma for s in SCORE[:6]] + [s - mb for s in SCORE[6:]])


def test_tfidf_soft_baseline_in_a_tiny_group():
    # two rows, texts "room x" vs "room y": TF-IDF vectors share "room" (idf 1) and differ in x/y
    # tokens of 1 char are dropped by the default token_pattern -> both vectors are just "room",
    # cos = 1, weights 1/2 each, baseline = mean, A_S = +-5.
    inp = AdvantageInputs(group=["g", "g"], traj=["t0", "t1"], step=[0, 0], reward=[10.0, 0.0], valid=[1, 1],
                          anchor=["room x", "room y"])
    out = compute_advantages(inp, AdvantageConfig(estimator="proxmo_soft_only"))
    close(out.extras["step_adv"], [5.0, -5.0])


@pytest.mark.parametrize("estimator", ["grpo", "gigpo", "proxmo", "proxmo_modulation_only", "proxmo_soft_only"])
def test_success_input_overrides_reward_threshold(estimator):
    # b1 claims failure explicitly: p_B drops from 2/3 to 1/3
    inp = inputs()
    succ = [True, True, False, False, False, False, True, True, False, False, False]
    out = compute_advantages(AdvantageInputs(**{**inp.__dict__, "success": succ}),
                             AdvantageConfig(estimator=estimator, gamma=0.5))
    close(out.extras["success_rate"], [1 / 3] * 11)
