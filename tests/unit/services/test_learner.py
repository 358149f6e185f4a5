"""The learner on a real (tiny) transformers model: update, micro-batching, masking, exact resume."""

from __future__ import annotations

import functools
import gc

import numpy as np
import pytest
import torch

from proxmo.config import AdvantageConfig, LossConfig
from services.codec import decode_group, encode_group
from services.config import LearnerConfig
from services.contracts import EpisodeRecord, GroupRecord, StepRecord
from services.learner import Learner, _pad_batch, flatten_groups, token_logprobs

CORPUS = [
    "You are in the kitchen. You see a fridge, a table and a red apple.",
    "take red apple | open fridge | put apple in fridge | look around | inventory",
    "<think></think><action>take red apple</action>",
] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from services.serving.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny"), CORPUS, hidden=32, layers=2, heads=2,
                                intermediate=64, max_position=128, seed=0))


def _groups(model_dir: str, n_groups: int = 2, g: int = 3, seed: int = 0) -> list[GroupRecord]:
    """Synthetic groups whose sampling log-probs come from the model itself (ratio 1 at the start)."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    groups = []
    for gi in range(n_groups):
        eps = []
        for e in range(g):
            won = (gi + e) % 2 == 0
            steps = []
            for s in range(3):
                prompt = rng.integers(5, vocab, size=int(rng.integers(6, 12))).astype(np.int32)
                resp = rng.integers(5, vocab, size=int(rng.integers(2, 5))).astype(np.int32)
                step = StepRecord(observation=f"room {s % 2}", action="take apple", reward=10.0 if (won and s == 2) else 0.0,
                                  valid=(s != 1 or e != 0), done=(s == 2), prompt_ids=prompt, response_ids=resp)
                ids, attn, mask = _pad_batch([step], torch.device("cpu"))
                with torch.no_grad():
                    lp, _ = token_logprobs(model, ids, attn)
                step.logprobs = lp[0][mask[0]].numpy().astype(np.float32)
                steps.append(step)
            eps.append(EpisodeRecord(steps=steps, won=won))
        groups.append(GroupRecord(task_id=f"t{gi}", episodes=eps, group_id=f"g{gi}"))
    return groups


def _params(learner: Learner) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in learner.model.parameters()])


def _learner(model_dir, **kw) -> Learner:
    cfg = LearnerConfig(lr=kw.pop("lr", 1e-3), micro_batch_size=kw.pop("micro_batch_size", 4), seed=0, **kw)
    return Learner(model_dir, cfg, AdvantageConfig(estimator="proxmo"), LossConfig())


def test_update_changes_weights_and_reports(model_dir):
    learner = _learner(model_dir)
    before = _params(learner)
    m = learner.update(_groups(model_dir))
    assert learner.step == 1
    assert not torch.equal(before, _params(learner))
    for key in ("loss/total", "grad_norm", "adv/mean", "rows"):
        assert np.isfinite(m[key]), key
    assert m["rows"] == 2 * 3 * 3


def test_frozen_parameters_stay_and_the_rest_trains(model_dir):
    learner = _learner(model_dir, freeze="embed_tokens, layers.0.")
    assert learner.frozen and all("embed_tokens" in n or "layers.0." in n for n in learner.frozen)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.update(_groups(model_dir))
    after = dict(learner.model.named_parameters())
    for n, p in after.items():
        assert torch.equal(before[n], p.detach()) == (n in learner.frozen), n
    assert "lm_head.weight" not in learner.frozen


def test_freeze_that_matches_nothing_or_everything_is_refused(model_dir):
    with pytest.raises(ValueError, match="match no parameter"):
        _learner(model_dir, freeze="embed_tokens,no_such_part")
    with pytest.raises(ValueError, match="no parameter to train"):
        _learner(model_dir, freeze="weight")


def test_resume_with_another_freeze_is_a_clear_error(model_dir, tmp_path):
    a = _learner(model_dir)
    a.update(_groups(model_dir))
    ckpt = a.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="learner.freeze"):
        _learner(model_dir, freeze="embed_tokens").load_checkpoint(ckpt)


def test_microbatch_split_does_not_change_the_update(model_dir):
    groups = _groups(model_dir)
    a, b = _learner(model_dir, micro_batch_size=1), _learner(model_dir, micro_batch_size=64)
    a.update(groups)
    b.update(groups)
    grads = [torch.cat([p.grad.flatten() for p in x.model.parameters() if p.grad is not None]) for x in (a, b)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # Adam divides by |g|: where a gradient is at the level of float rounding (~1e-8) the step's
    # sign can differ, so the parameters agree to a fraction of the learning rate (1e-3), not to 1e-6.
    assert torch.allclose(_params(a), _params(b), atol=1e-5)


def _live_step_records() -> int:
    gc.collect()
    return sum(type(o) is StepRecord for o in gc.get_objects())


def test_decoded_groups_train_like_eager_ones_without_building_steps(model_dir):
    """Issue 3: the learner reads a decoded group's columns; same rows and same update as the eager group."""
    eager = _groups(model_dir)
    eager[1].episodes[2].infra_failure = True
    wire = [encode_group(g) for g in eager]
    before = _live_step_records()
    decoded = [decode_group(w) for w in wire]
    a, b = flatten_groups(eager), flatten_groups(decoded)
    _pad_batch(b.steps, torch.device("cpu"))
    assert _live_step_records() == before  # decode + flatten + padding built no StepRecord
    for name in ("group", "traj", "step", "reward", "valid", "anchor", "success", "mask"):
        assert getattr(a.inputs, name) == getattr(b.inputs, name), name
    np.testing.assert_array_equal(a.trainable, b.trainable)
    for ra, rb in zip(a.steps, b.steps, strict=True):
        for arr in ("prompt_ids", "response_ids", "logprobs"):
            np.testing.assert_array_equal(getattr(ra, arr), getattr(rb, arr))
    la, lb = _learner(model_dir), _learner(model_dir)
    la.update(eager)
    lb.update(decoded)
    assert torch.equal(_params(la), _params(lb))
    assert _live_step_records() == before


def test_infra_failure_rows_are_masked(model_dir):
    groups = _groups(model_dir)
    groups[0].episodes[1].infra_failure = True
    rows = flatten_groups(groups)
    failed = {"g0/1"}
    for traj, trainable in zip(rows.inputs.traj, rows.trainable):
        assert trainable == (traj not in failed)


def test_resume_continues_exactly(model_dir, tmp_path):
    groups1, groups2 = _groups(model_dir, seed=1), _groups(model_dir, seed=2)
    a = _learner(model_dir)
    a.update(groups1)
    a.version = 1
    a.save_checkpoint(tmp_path / "ckpt", {"iteration": 1})
    # The checkpoint is a complete HF folder: its own tokenizer and chat template load with it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    a.update(groups2)
    b = _learner(model_dir)
    meta = b.load_checkpoint(tmp_path / "ckpt")
    assert meta["iteration"] == 1 and b.step == 1 and b.version == 1
    b.update(groups2)
    assert torch.equal(_params(a), _params(b))  # optimizer moments and RNG restored too


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        _learner(str(tmp_path / "nothing"))


def test_non_finite_rewards_are_refused(model_dir):
    groups = _groups(model_dir)
    groups[0].episodes[0].steps[0].reward = float("nan")
    with pytest.raises(ValueError):
        _learner(model_dir).update(groups)


def test_response_only_logprobs_equal_full_logits(model_dir):
    """The head-on-response-positions path gives the full-logits numbers at those positions, 0 elsewhere."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = [step for g in _groups(model_dir, n_groups=1) for e in g.episodes for step in e.steps]
    ids, attn, mask = _pad_batch(steps, torch.device("cpu"))
    with torch.no_grad():
        full, full_ent = token_logprobs(model, ids, attn, with_entropy=True)
        fast, fast_ent = token_logprobs(model, ids, attn, with_entropy=True, mask=mask)
    assert mask.any() and not mask.all()
    torch.testing.assert_close(fast[mask], full[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_ent[mask], full_ent[mask], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(fast[~mask]) == 0 and torch.count_nonzero(fast_ent[~mask]) == 0


def _prefixed_rows(vocab: int, prefix: int, n: int = 6, seed: int = 0):
    from services.learner import RowTokens

    rng = np.random.default_rng(seed)
    head = rng.integers(5, vocab, size=prefix)
    rows = []
    for _ in range(n):
        prompt = np.concatenate([head, rng.integers(5, vocab, size=int(rng.integers(1, 9)))]).astype(np.int32)
        resp = rng.integers(5, vocab, size=int(rng.integers(2, 6))).astype(np.int32)
        rows.append(RowTokens(prompt, resp, np.zeros(len(resp), np.float32)))
    return rows


def test_shared_prefix_gives_the_full_forwards_values_and_gradients(model_dir):
    """The common prompt prefix runs once; log-probs, entropies and every gradient match the plain path."""
    from transformers import AutoModelForCausalLM

    from services.learner import shared_prefix_len

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, attn, mask = _pad_batch(_prefixed_rows(model.config.vocab_size, prefix=20), torch.device("cpu"))
    assert shared_prefix_len(ids, mask) >= 20
    out = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        lp, ent = token_logprobs(model, ids, attn, with_entropy=True, mask=mask, share_prefix=share)
        (lp.sum() + 0.1 * ent.sum()).backward()
        out[share] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    for name, grad in out[False][2].items():
        torch.testing.assert_close(out[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.count_nonzero(out[True][0][~mask]) == 0


def test_shared_prefix_stops_before_the_first_response_and_needs_two_rows(model_dir):
    from services.learner import shared_prefix_len

    rows = _prefixed_rows(1000, prefix=20)
    same = [rows[0]._replace(response_ids=r.response_ids) for r in rows]  # identical prompts
    ids, _, mask = _pad_batch(same, torch.device("cpu"))
    # the hidden state of the last prompt token predicts the first response token: it stays out of the prefix
    assert shared_prefix_len(ids, mask) == len(rows[0].prompt_ids) - 1
    ids, _, mask = _pad_batch(rows[:1], torch.device("cpu"))
    assert shared_prefix_len(ids, mask) == 0
    ids, _, mask = _pad_batch(_prefixed_rows(1000, prefix=0), torch.device("cpu"))
    assert shared_prefix_len(ids, mask) < 3  # random prompts: at most a chance match


def test_shared_prefix_excludes_positions_a_row_masks_out():
    # Left padding: identical pad columns must not count as a shared prefix (it runs unmasked).
    from services.learner import shared_prefix_len

    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [0, 0, 5, 6, 7, 8, 3]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    mask = torch.zeros((2, 6), dtype=torch.bool)
    mask[:, 5] = True
    assert shared_prefix_len(ids, mask) == 5
    assert shared_prefix_len(ids, mask, attn) == 0
    assert shared_prefix_len(ids, mask, torch.ones_like(attn)) == 5


def test_duplicate_rows_share_a_forward_and_the_update_is_unchanged(model_dir):
    """Identical (prompt, response) rows run once; each still counts with its own advantage."""
    import copy

    groups = _groups(model_dir)
    for g in groups:  # the same first turn in two episodes of a group, with other outcomes after it
        g.episodes[1].steps[0] = copy.deepcopy(g.episodes[0].steps[0])
        g.episodes[2].steps[0] = copy.deepcopy(g.episodes[0].steps[0])
    dedup, plain = _learner(model_dir), _learner(model_dir)
    plain._forward_batches = functools.partial(plain._forward_batches, merge=False)
    forwarded = []
    original = dedup._micro_step
    dedup._micro_step = lambda steps, reps, members, *a: forwarded.append(len(reps)) or original(steps, reps, members, *a)
    m_dedup, m_plain = dedup.update(copy.deepcopy(groups)), plain.update(copy.deepcopy(groups))
    assert sum(forwarded) == 2 * 3 * 3 - 2 * 2  # two rows of each group ride on another's forward
    grads = [torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
             for learner in (dedup, plain)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)
    assert m_dedup["loss/total"] == pytest.approx(m_plain["loss/total"], rel=1e-5, abs=1e-7)


def test_mini_batches_take_one_optimizer_step_each_and_are_reproducible(model_dir):
    groups = _groups(model_dir)
    a, b, one = (_learner(model_dir, ppo_mini_batches=3) for _ in range(3))
    one.cfg.ppo_mini_batches = 1
    for learner in (a, b, one):
        m = learner.update(groups)
        assert np.isfinite(m["loss/total"])
    assert a.step == b.step == 3 and one.step == 1
    assert torch.equal(_params(a), _params(b))  # the random split is seeded by the step count
    assert not torch.equal(_params(a), _params(one))


def test_logprobs_follow_the_sampling_temperature(model_dir):
    from transformers import AutoModelForCausalLM

    from services.learner import RowTokens, _pad_batch, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [RowTokens(np.array([5, 6, 7, 8], np.int32), np.array([9, 10, 11], np.int32), np.zeros(3, np.float32))]
    ids, attn, resp = _pad_batch(rows, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        for t in (0.5, 1.0, 2.0):
            want = torch.log_softmax(logits / t, -1).gather(-1, ids[:, 1:, None])[..., 0][resp]
            got, ent = token_logprobs(model, ids, attn, with_entropy=True, mask=resp, temperature=t)
            assert torch.allclose(got[resp], want, atol=1e-5)
    with pytest.raises(ValueError, match="must be > 0"):
        Learner(model_dir, LearnerConfig(), AdvantageConfig(), LossConfig(), temperature=0.0)


def test_recomputed_old_logprobs_are_the_pre_update_policy_for_every_mini_batch(model_dir):
    """learner.recompute_old_logprobs: later mini-batches see ratios off 1 (clipping stays on),
    and the update equals one whose sampler log-probs were this model's to begin with."""
    groups = _groups(model_dir)  # sampler log-probs = the model's own
    zeroed = _groups(model_dir)
    for g in zeroed:
        for e in g.episodes:
            for s in e.steps:
                s.logprobs = np.zeros_like(s.logprobs)  # what the learner must not use
    sampler = _learner(model_dir, ppo_mini_batches=3, lr=5e-2)
    recompute = _learner(model_dir, ppo_mini_batches=3, lr=5e-2, recompute_old_logprobs=True)
    m_sampler, m_recompute = sampler.update(groups), recompute.update(zeroed)
    assert abs(m_recompute["loss/ratio_mean"] - 1.0) > 1e-3  # the last mini-batch: off-policy by 2 steps
    assert m_recompute["loss/ratio_mean"] == pytest.approx(m_sampler["loss/ratio_mean"], abs=1e-5)
    # 3 Adam steps at lr 5e-2 move parameters by up to 0.15; rounding (per-row vs batched log-probs) stays < 1e-4
    assert torch.allclose(_params(sampler), _params(recompute), atol=1e-4)


# --------------------------------------------------------------------------- it learns

BANDIT_PROMPT = "You are in the kitchen. You see a fridge, a table and a red apple."
BANDIT_ARMS = ("<think></think><action>take red apple</action>", "<think></think><action>open fridge</action>")


def _arm_logprobs(model, tok, prompt_ids: np.ndarray, arms: list[np.ndarray]) -> np.ndarray:
    """Per-token log-probs of each whole arm after the prompt, under the current model."""
    steps = [StepRecord(observation="", action="", reward=0.0, valid=True, done=True, prompt_ids=prompt_ids,
                        response_ids=a) for a in arms]
    ids, attn, mask = _pad_batch(steps, torch.device("cpu"))
    with torch.no_grad():
        lp, _ = token_logprobs(model, ids, attn, mask=mask)
    return [lp[i][mask[i]].numpy().astype(np.float32) for i in range(len(arms))]


@pytest.mark.parametrize("estimator", ["proxmo", "gigpo", "grpo"])
@pytest.mark.parametrize("rewarded", [0, 1])
def test_the_update_learns_a_one_step_choice(model_dir, estimator, rewarded):
    """End to end through advantages, loss and optimizer: groups sampled on-policy from two
    responses, reward 1 for one of them; a few updates must make that response the likely one.

    A flipped sign anywhere on the advantage -> loss path, or an update that does not
    follow the sampled tokens, moves the probability the other way or not at all.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = np.array(tok(BANDIT_PROMPT, add_special_tokens=False)["input_ids"], np.int32)
    arms = [np.array(tok(a, add_special_tokens=False)["input_ids"], np.int32) for a in BANDIT_ARMS]
    cfg = LearnerConfig(lr=3e-3, micro_batch_size=16, seed=0)
    learner = Learner(model_dir, cfg, AdvantageConfig(estimator=estimator), LossConfig())
    rng = np.random.default_rng(0)

    def p_rewarded(lps) -> float:
        seq = np.array([lp.sum() for lp in lps], dtype=np.float64)
        p = np.exp(seq - seq.max())
        return float(p[rewarded] / p.sum())  # restricted to the two arms: what the sampler below draws from

    start = p_rewarded(_arm_logprobs(learner.model, tok, prompt, arms))
    for _ in range(8):
        lps = _arm_logprobs(learner.model, tok, prompt, arms)
        p = p_rewarded(lps)
        groups = []
        for gi in range(4):
            eps = []
            for _ in range(8):
                arm = rewarded if rng.random() < p else 1 - rewarded
                won = arm == rewarded
                eps.append(EpisodeRecord(won=won, steps=[StepRecord(
                    observation=BANDIT_PROMPT, action=BANDIT_ARMS[arm], reward=float(won), valid=True, done=True,
                    prompt_ids=prompt, response_ids=arms[arm], logprobs=lps[arm])]))
            groups.append(GroupRecord(task_id=f"t{gi}", episodes=eps, group_id=f"g{gi}"))
        learner.update(groups)
    end = p_rewarded(_arm_logprobs(learner.model, tok, prompt, arms))
    assert end > max(0.9, start + 0.2), (start, end)
