"""Lazy, columnar decoded groups (issue 3): same records as the eager ones, no StepRecord built
until ``steps`` is read, and every check still applied when a decoded group is encoded again."""

from __future__ import annotations

import copy
import gc
import pickle  # only to check that a lazy record survives the object store; records never travel as pickle

import numpy as np
import pytest

from services.buffer.synthetic import make_group, small_group
from services.codec import columns_of, decode_group, encode_group
from services.contracts import EpisodeRecord, GroupRecord, RecordError, StepColumns, StepRecord
from services.contracts import decode_group as decode_via_contracts

COLUMN_FIELDS = ("ep_steps", "obs", "act", "info", "reward", "valid", "done", "pv", "p_len", "q_len", "p", "q", "lp")


def _live_steps() -> int:
    gc.collect()
    return sum(type(o) is StepRecord for o in gc.get_objects())


def _assert_same_columns(a: StepColumns, b: StepColumns) -> None:
    for name in COLUMN_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y, name


def _group() -> GroupRecord:
    g = make_group(episodes=4, steps=6, prompt_tokens=300, response_tokens=9, policy_version=2, seed=3)
    g.episodes[1].infra_failure = True
    g.episodes[1].failure_reason = "env step timed out ✗"
    g.episodes[2].steps[3].info = {"score": 0.5, "nested": {"a": [1, 2]}}
    g.episodes[3].steps = []
    g.finished_at = g.created_at + 2.0
    return g


def test_lazy_group_equals_eager_one_field_by_field():
    g = _group()
    lazy = decode_group(encode_group(g))
    assert lazy.decoded_columns() is not None
    # columns first (no steps built), then every field of every materialised step
    _assert_same_columns(lazy.step_columns(), columns_of(g))
    assert [e.num_steps for e in lazy.episodes] == [len(e.steps) for e in g.episodes]
    assert [e.total_reward for e in lazy.episodes] == [e.total_reward for e in g.episodes]
    assert lazy.num_steps == g.num_steps
    for name in ("task_id", "env_name", "task_type", "worker_id", "policy_version", "group_id",
                 "created_at", "finished_at", "schema_version"):
        assert getattr(lazy, name) == getattr(g, name), name
    for ea, eb in zip(g.episodes, lazy.episodes, strict=True):
        assert (ea.won, ea.score, ea.task_type, ea.infra_failure, ea.failure_reason) == (
            eb.won, eb.score, eb.task_type, eb.infra_failure, eb.failure_reason)
        assert len(ea.steps) == len(eb.steps)
        for sa, sb in zip(ea.steps, eb.steps, strict=True):
            assert type(sb) is StepRecord
            assert (sa.observation, sa.action, sa.reward, sa.valid, sa.done, sa.policy_version, sa.info) == (
                sb.observation, sb.action, sb.reward, sb.valid, sb.done, sb.policy_version, sb.info)
            assert (type(sb.reward), type(sb.valid), type(sb.done), type(sb.policy_version)) == (float, bool, bool, int)
            for arr in ("prompt_ids", "response_ids", "logprobs"):
                np.testing.assert_array_equal(getattr(sa, arr), getattr(sb, arr))
                assert getattr(sb, arr).dtype == getattr(sa, arr).dtype and getattr(sb, arr).flags.writeable
    assert lazy.decoded_columns() is None  # steps were read: the lists are the truth now


def test_contracts_still_exports_the_codec():
    g = small_group()
    assert encode_group(decode_via_contracts(encode_group(g))) == encode_group(g)


def test_decode_and_columns_build_no_step_records():
    g = make_group(episodes=8, steps=50, prompt_tokens=1000, seed=1)
    data = encode_group(g)
    del g
    before = _live_steps()
    groups = [decode_group(data) for _ in range(3)]
    cols = [x.step_columns() for x in groups]
    again = [encode_group(x) for x in groups]  # an untouched decoded group re-encodes from its columns
    assert _live_steps() == before
    assert all(a == data for a in again)
    assert [len(c.reward) for c in cols] == [400] * 3
    assert sum(e.num_steps for e in groups[0].episodes) == 400
    assert _live_steps() == before
    assert len(groups[0].episodes[5].steps) == 50  # reading one episode builds only its steps
    assert _live_steps() == before + 50


def test_reading_steps_once_keeps_the_same_objects():
    lazy = decode_group(encode_group(small_group()))
    ep = lazy.episodes[2]
    assert ep.steps is ep.steps
    ep.steps[0].reward = 4.0  # edits of the built steps are what gets encoded next
    assert decode_group(encode_group(lazy)).episodes[2].steps[0].reward == 4.0


def test_edits_after_decode_are_encoded_and_checked():
    g = small_group(seed=2)
    data = encode_group(g)

    lazy = decode_group(data)
    lazy.episodes.append(EpisodeRecord(steps=[StepRecord("o", "a", 1.0, True, True)], won=True))
    back = decode_group(encode_group(lazy))
    assert len(back.episodes) == len(g.episodes) + 1 and back.episodes[-1].steps[0].observation == "o"

    lazy = decode_group(data)
    lazy.episodes[0].steps = []  # assigning steps replaces the columns of that episode
    assert decode_group(encode_group(lazy)).episodes[0].num_steps == 0

    lazy = decode_group(data)
    lazy.step_columns().lp[42] = np.nan  # step 5 (8 tokens per step); in-place edits of the columns are validated again
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[2\]\.logprobs: not all finite"):
        encode_group(lazy)

    lazy = decode_group(data)
    lazy.step_columns().obs[4] = 7
    with pytest.raises(RecordError, match=r"episodes\[1\]\.steps\[1\]\.o: expected str"):
        encode_group(lazy)

    lazy = decode_group(data)
    lazy.step_columns().p[:] = -1
    with pytest.raises(RecordError, match="negative token id"):
        encode_group(lazy)

    lazy = decode_group(data)
    lazy.step_columns().reward = np.zeros(3)
    with pytest.raises(RecordError, match="steps.r: 3 values for 24 steps"):
        encode_group(lazy)


def test_lazy_records_copy_and_compare():
    data = encode_group(small_group(seed=4))
    lazy = decode_group(data)
    clone = copy.deepcopy(lazy)
    assert encode_group(clone) == data and clone.decoded_columns() is not None
    thawed = pickle.loads(pickle.dumps(decode_group(data)))  # Ray's object store pickles actor arguments
    assert encode_group(thawed) == data
    assert clone.episodes[0].steps[1].observation == lazy.episodes[0].steps[1].observation
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lazy.episodes[0].nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'steps'"):
        EpisodeRecord.__new__(EpisodeRecord).steps  # noqa: B018


def test_columns_of_an_eager_group_are_checked():
    g = small_group()
    g.episodes[0].steps[1].reward = float("inf")
    with pytest.raises(RecordError, match=r"episodes\[0\]\.steps\[1\]\.reward: not finite"):
        columns_of(g)
    with pytest.raises(RecordError, match="not finite"):
        g.step_columns()
