"""Steps recorded as columns by the rollout worker (issue 3): ``EpisodeSteps`` + ``columnar_group``
give the same record as StepRecords gathered at push, bad steps are refused when they are
recorded or encoded, and nothing builds a StepRecord unless ``steps`` is read."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from services.buffer.synthetic import columnar, make_group, replay
from services.codec import columns_of, decode_group, encode_group
from services.contracts import EpisodeSteps, RecordError, StepRecord, columnar_group

from .test_codec_lazy import _assert_same_columns, _group


def _step(**kw):
    base = dict(observation="a room", action="look", reward=0.0, valid=True, done=False,
                prompt_ids=[1, 2, 3], response_ids=[4, 5], logprobs=[-0.1, -0.2], policy_version=1, info={})
    return {**base, **kw}


@pytest.mark.parametrize("shape", [(8, 50, 1000, 24), (8, 3, 64, 8), (1, 1, 1, 1)])
def test_columnar_group_encodes_to_the_same_bytes_as_gathered_steps(shape):
    e, s, p, q = shape
    g = make_group(episodes=e, steps=s, prompt_tokens=p, response_tokens=q, policy_version=3, seed=5)
    assert encode_group(columnar(g)) == encode_group(g)


def test_columnar_group_equals_the_step_records_field_by_field():
    g = _group()  # an infra failure, nested info, an episode with no steps
    c = columnar(g)
    assert c.decoded_columns() is not None  # encode takes the column path
    _assert_same_columns(c.step_columns(), columns_of(g))
    for ea, eb in zip(g.episodes, c.episodes, strict=True):
        assert (ea.won, ea.score, ea.task_type, ea.infra_failure, ea.failure_reason) == (
            eb.won, eb.score, eb.task_type, eb.infra_failure, eb.failure_reason)
        assert len(ea.steps) == eb.num_steps
        for sa, sb in zip(ea.steps, eb.steps, strict=True):
            for name in ("observation", "action", "reward", "valid", "done", "policy_version", "info"):
                assert getattr(sa, name) == getattr(sb, name), name
            for name in ("prompt_ids", "response_ids", "logprobs"):
                np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name))
                assert getattr(sa, name).dtype == getattr(sb, name).dtype
    back = decode_group(encode_group(c))
    _assert_same_columns(back.step_columns(), columns_of(g))


def test_recording_and_encoding_build_no_step_records():
    logs, eps, fields = replay(make_group(episodes=4, steps=10, prompt_tokens=50, response_tokens=4, seed=1))
    gc.collect()
    before = sum(type(o) is StepRecord for o in gc.get_objects())
    g = columnar_group(logs, eps, **fields)
    encode_group(g)
    gc.collect()
    assert sum(type(o) is StepRecord for o in gc.get_objects()) == before
    assert len(g.episodes[2].steps) == 10  # built on demand


def test_columns_grow_past_their_first_capacity():
    log = EpisodeSteps()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50_000, int(rng.integers(1, 3000))).tolist() for _ in range(40)]
    for p in prompts:
        log.add(**_step(prompt_ids=p))
    g = columnar_group([log], [{"won": True}], task_id="t")
    steps = g.episodes[0].steps
    assert [s.prompt_ids.tolist() for s in steps] == prompts
    assert all(s.prompt_ids.dtype == np.int32 for s in steps)
    assert g.episodes[0].won and g.episodes[0].task_type == ""  # unnamed fields keep their defaults


@pytest.mark.parametrize("bad, match", [
    ({"logprobs": [-0.1]}, "1 log-probs for 2 response tokens"),
    ({"logprobs": None}, "TypeError"),
    ({"prompt_ids": [1, 2**31]}, "OverflowError"),
    ({"response_ids": [[1, 2], [3, 4]], "logprobs": [0.0, 0.0]}, "ValueError"),
    ({"prompt_ids": ["a", "b"]}, "ValueError"),
])
def test_a_bad_step_is_refused_and_the_episode_stays_usable(bad, match):
    log = EpisodeSteps()
    log.add(**_step())
    with pytest.raises(RecordError, match=match):
        log.add(**_step(**bad))
    log.add(**_step(prompt_ids=[7, 8]))
    assert len(log) == 2
    back = decode_group(encode_group(columnar_group([log], [{}], task_id="t")))
    assert [s.prompt_ids.tolist() for s in back.episodes[0].steps] == [[1, 2, 3], [7, 8]]


def test_encode_names_the_step_with_a_negative_id_or_bad_reward():
    a, b = EpisodeSteps(), EpisodeSteps()
    a.add(**_step())
    b.add(**_step())
    b.add(**_step(prompt_ids=[1, -5]))
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[1\]\.prompt_ids: negative token id"):
        encode_group(columnar_group([a, b], [{}, {}], task_id="t"))
    c = EpisodeSteps()
    c.add(**_step(reward=float("nan")))
    with pytest.raises(RecordError, match=r"episodes\[0\]\.steps\[0\]\.reward: not finite"):
        encode_group(columnar_group([c], [{}], task_id="t"))


def test_columnar_group_refuses_mismatched_or_unknown_episode_fields():
    with pytest.raises(ValueError, match="1 step logs for 2 episodes"):
        columnar_group([EpisodeSteps()], [{}, {}], task_id="t")
    with pytest.raises(TypeError, match="unknown EpisodeRecord fields"):
        columnar_group([EpisodeSteps()], [{"wonn": True}], task_id="t")


def test_recorded_steps_read_back_as_step_records():
    log = EpisodeSteps()
    log.add(**_step())
    log.add(**_step(action="take apple", reward=1.0, done=True, prompt_ids=[9], response_ids=[8],
                    logprobs=[-1.5], info={"score": 1}))
    first, last = log  # iteration
    assert first.action == "look" and first.prompt_ids.tolist() == [1, 2, 3]
    assert log[-1].action == last.action == "take apple" and last.done and last.reward == 1.0
    assert last.prompt_ids.tolist() == [9] and last.logprobs.dtype == np.float32 and last.info == {"score": 1}
    with pytest.raises(IndexError):
        log[2]
