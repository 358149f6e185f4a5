"""Typed contracts for every hop between services.

A finished episode group travels rollout worker -> Redis -> learner as one
:class:`GroupRecord`. Redis is a network boundary, so records are encoded with
msgpack (never pickle) by :mod:`services.codec`, the one serializer, which
also holds the wire format, its history and the validation that
:func:`~services.codec.encode_group` and :func:`~services.codec.decode_group`
share (:func:`~services.codec.validate_group`). ``encode_group``,
``decode_group`` and ``validate_group`` stay importable from here.

Columnar, lazy records (issue 3): a decoded group keeps its steps as
:class:`StepColumns` (numpy arrays plus offsets) and builds the
:class:`StepRecord` objects of an episode only when ``episode.steps`` is first
read. Building the 400 StepRecords of a realistic group cost ~0.6 ms, and
holding thousands of such objects made the garbage collector traverse them
again and again (~1.3 ms more per group while the learner held 16 groups);
both were larger than one raw XADD of the record. Readers that want numbers,
not objects, call :meth:`GroupRecord.step_columns`; re-encoding an untouched
decoded group reuses its columns. Once ``steps`` is read (or assigned), the
list is the episode's truth and the columns are no longer used.

The rollout worker builds its groups the same way (session 7): each turn is
appended to its episode's :class:`EpisodeSteps` columns, and
:func:`columnar_group` joins the episodes into one :class:`StepColumns` when the
group is done, so no StepRecord is built on the producer side either and push
encodes without a per-step gather.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # re-exported lazily (see __getattr__ at the bottom): codec imports this module
    from services.codec import decode_group, encode_group, validate_group  # noqa: F401

SCHEMA_VERSION = 4
MAGIC = b"PXG1"


class RecordError(ValueError):
    """A record cannot be decoded or fails schema validation."""


@dataclass
class StepRecord:
    """One agent turn: the prompt the policy saw, what it sampled, what the env returned."""

    observation: str  # anchor state for step grouping (raw env observation before the action)
    action: str  # parsed action ("" when invalid)
    reward: float
    valid: bool  # the model output parsed into an action
    done: bool
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    response_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # per response token
    policy_version: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able extras (admissible count, score...)

    def __post_init__(self) -> None:
        self.prompt_ids = _token_array(self.prompt_ids, "prompt_ids")
        self.response_ids = _token_array(self.response_ids, "response_ids")
        if not (type(self.logprobs) is np.ndarray and self.logprobs.dtype == np.float32):
            self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.logprobs.ndim != 1:
            raise RecordError(f"logprobs must be 1-D, got shape {self.logprobs.shape}")


_I32_MAX = 2**31 - 1


def _token_array(x: Any, name: str) -> np.ndarray:
    """Token ids as 1-D int32; refuses values that a silent int32 cast would wrap."""
    if type(x) is np.ndarray and x.dtype == np.int32 and x.ndim == 1:
        return x  # the common case (decoder, rollout worker): nothing to convert or check
    a = np.asarray(x)
    if a.ndim != 1:
        raise RecordError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int32)
    if a.dtype.kind not in "iu":
        raise RecordError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.dtype != np.int32 and (int(a.min()) < 0 or int(a.max()) > _I32_MAX):
        raise RecordError(f"{name} holds ids outside 0..{_I32_MAX}")
    return a.astype(np.int32, copy=False)


@dataclass
class StepColumns:
    """All steps of a group, flattened in episode order (the wire layout); S steps in all.

    The token and log-prob arrays of step ``k`` are ``p[p_off[k]:p_off[k + 1]]``,
    ``q[q_off[k]:q_off[k + 1]]`` and ``lp[q_off[k]:q_off[k + 1]]``.
    """

    ep_steps: np.ndarray  # int64 [E] steps per episode
    obs: list[str]
    act: list[str]
    info: list[dict[str, Any]]
    reward: np.ndarray  # float64 [S]
    valid: np.ndarray  # uint8 [S]
    done: np.ndarray  # uint8 [S]
    pv: np.ndarray  # int64 [S]
    p_len: np.ndarray  # int64 [S]
    q_len: np.ndarray  # int64 [S] (also the log-prob count)
    p: np.ndarray  # int32 [sum p_len]
    q: np.ndarray  # int32 [sum q_len]
    lp: np.ndarray  # float32 [sum q_len]

    @property
    def p_off(self) -> np.ndarray:
        """int64 [S + 1] start of each step's prompt ids in ``p`` (and the end)."""
        return np.concatenate([[0], np.cumsum(self.p_len)])

    @property
    def q_off(self) -> np.ndarray:
        """int64 [S + 1] start of each step's response ids / log-probs in ``q`` / ``lp`` (and the end)."""
        return np.concatenate([[0], np.cumsum(self.q_len)])


@dataclass
class EpisodeRecord:
    """One episode of a group. ``steps`` of a decoded episode is built on first access (module docstring)."""

    steps: list[StepRecord]
    won: bool = False
    score: float = 0.0  # environment score (e.g. WebShop's 0..1), separate from success
    task_type: str = ""
    infra_failure: bool = False  # env crashed / hung: masked out of group statistics
    failure_reason: str = ""

    @classmethod
    def _lazy(cls, cols: StepColumns, start: int, stop: int, **kw: Any) -> EpisodeRecord:
        """An episode over steps ``start:stop`` of ``cols``, without ``steps`` in its ``__dict__``."""
        ep = object.__new__(cls)
        ep.__dict__.update(kw, _cols=cols, _span=(start, stop))
        return ep

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails: for ``steps`` of a lazy episode, once.
        span = self.__dict__.get("_span")
        if name != "steps" or span is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        from services.codec import steps_from_columns

        # setdefault: two threads that build the steps at once both get the list that was stored first
        return self.__dict__.setdefault("steps", steps_from_columns(self.__dict__["_cols"], *span))

    @property
    def num_steps(self) -> int:
        if "steps" in self.__dict__ or "_span" not in self.__dict__:
            return len(self.steps)
        start, stop = self.__dict__["_span"]
        return stop - start

    @property
    def total_reward(self) -> float:
        if "steps" in self.__dict__ or "_span" not in self.__dict__:
            return float(sum(s.reward for s in self.steps))
        start, stop = self.__dict__["_span"]
        return float(self.__dict__["_cols"].reward[start:stop].sum())


@dataclass
class GroupRecord:
    """All G episodes of one task (same task id, same seed)."""

    task_id: str
    episodes: list[EpisodeRecord]
    env_name: str = ""
    task_type: str = ""
    worker_id: str = ""
    policy_version: int = 0  # oldest policy version that produced any step of the group
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # idempotence key
    created_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def num_steps(self) -> int:
        return sum(e.num_steps for e in self.episodes)

    def decoded_columns(self) -> StepColumns | None:
        """The columns this group was decoded from (or built from, by :func:`columnar_group`), while they
        still describe it exactly: every episode lazy (``steps`` never read or assigned), in order,
        covering the columns. Else None."""
        eps = self.episodes
        cols = eps[0].__dict__.get("_cols") if eps else None
        if cols is None or len(eps) != len(cols.ep_steps):
            return None
        at = 0
        for e in eps:
            d = e.__dict__
            if "steps" in d or d.get("_cols") is not cols or d["_span"][0] != at:
                return None
            at = d["_span"][1]
        return cols if at == int(cols.ep_steps.sum()) else None

    def step_columns(self) -> StepColumns:
        """Every step as columns (validated); no StepRecord is built for a decoded, untouched group."""
        cols = self.decoded_columns()
        if cols is not None:
            return cols
        from services.codec import columns_of

        return columns_of(self)


class _Growing:
    """A 1-D array that grows by doubling; ``view()`` is the filled part (no copy)."""

    __slots__ = ("data", "n")

    def __init__(self, dtype: type, capacity: int = 256) -> None:
        self.data = np.empty(capacity, dtype)
        self.n = 0

    def extend(self, values: Any) -> int:
        """Append ``values`` (a list from the tokenizer or an array); returns how many were added."""
        k = len(values)
        if self.n + k > len(self.data):
            grown = np.empty(max(2 * len(self.data), self.n + k), self.data.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        # numpy converts a list straight into place; ids past int32 raise OverflowError
        self.data[self.n:self.n + k] = values
        self.n += k
        return k

    def view(self) -> np.ndarray:
        return self.data[:self.n]


class EpisodeSteps:
    """The steps of one episode, recorded column by column as the rollout plays them (issue 3).

    The rollout worker used to build one :class:`StepRecord` per turn (~9 us each, with its
    array checks) and the buffer's push then gathered the 400 records of a realistic group back
    into columns (~0.45 ms); here each turn appends its numbers and token ids to the episode's
    columns directly, and :func:`columnar_group` joins the episodes into the group's
    :class:`StepColumns` once, at the end. The columns are validated at encode, exactly as
    gathered ones were.
    """

    def __init__(self) -> None:
        self.obs: list[str] = []
        self.act: list[str] = []
        self.info: list[dict[str, Any]] = []
        self.reward: list[float] = []
        self.valid: list[bool] = []
        self.done: list[bool] = []
        self.pv: list[int] = []
        self.p_len: list[int] = []
        self.q_len: list[int] = []
        self.p = _Growing(np.int32, 4096)
        self.q = _Growing(np.int32)
        self.lp = _Growing(np.float32)

    def add(self, *, observation: str, action: str, reward: float, valid: bool, done: bool,
            prompt_ids: Any, response_ids: Any, logprobs: Any, policy_version: int,
            info: dict[str, Any] | None = None) -> None:
        """One turn; the same fields as :class:`StepRecord`."""
        k = len(self.obs)
        try:
            if len(logprobs) != len(response_ids):
                raise RecordError(f"step {k}: {len(logprobs)} log-probs for {len(response_ids)} response tokens")
            self.p.extend(prompt_ids)
            self.q.extend(response_ids)
            self.lp.extend(logprobs)
        except (OverflowError, TypeError, ValueError) as exc:  # not sequences, nested, ids past int32...
            # drop whatever part of this step was appended: the columns stay in step with the lists
            self.p.n, self.q.n, self.lp.n = sum(self.p_len), sum(self.q_len), sum(self.q_len)
            raise RecordError(f"step {k}: {type(exc).__name__}: {exc}") from exc
        self.p_len.append(len(prompt_ids))
        self.q_len.append(len(response_ids))
        self.obs.append(observation)
        self.act.append(action)
        self.info.append({} if info is None else info)
        self.reward.append(float(reward))
        self.valid.append(bool(valid))
        self.done.append(bool(done))
        self.pv.append(int(policy_version))

    def __len__(self) -> int:
        return len(self.obs)

    def __getitem__(self, k: int) -> StepRecord:
        """Step ``k`` as a :class:`StepRecord` (built on demand, arrays copied: to inspect, not to record)."""
        n = len(self.obs)
        if not isinstance(k, int) or not -n <= k < n:
            raise IndexError(f"step {k!r} of an episode with {n} steps")
        k %= n
        p0, q0 = sum(self.p_len[:k]), sum(self.q_len[:k])
        p1, q1 = p0 + self.p_len[k], q0 + self.q_len[k]
        return StepRecord(self.obs[k], self.act[k], self.reward[k], self.valid[k], self.done[k],
                          self.p.view()[p0:p1].copy(), self.q.view()[q0:q1].copy(), self.lp.view()[q0:q1].copy(),
                          self.pv[k], self.info[k])

    def __iter__(self) -> Iterator[StepRecord]:
        return (self[k] for k in range(len(self.obs)))

    @property
    def invalid_steps(self) -> int:
        return self.valid.count(False)


# every EpisodeRecord field but steps, with its default (EpisodeRecord._lazy bypasses __init__)
_EPISODE_DEFAULTS = {f.name: f.default for f in fields(EpisodeRecord) if f.name != "steps"}


def columnar_group(logs: list[EpisodeSteps], episodes: list[dict[str, Any]], **group: Any) -> GroupRecord:
    """A :class:`GroupRecord` over the columns of ``logs`` (one per episode, in order).

    ``episodes[i]`` holds episode ``i``'s :class:`EpisodeRecord` fields other than ``steps``
    (won, score, task_type, ...), ``group`` the :class:`GroupRecord` fields other than
    ``episodes``. The episodes are lazy views of one :class:`StepColumns`, as decoded ones are,
    so encoding needs no per-step work; reading ``episode.steps`` builds StepRecords as usual.
    """
    if len(logs) != len(episodes):
        raise ValueError(f"{len(logs)} step logs for {len(episodes)} episodes")

    def joined(name: str) -> list[Any]:
        return [x for log in logs for x in getattr(log, name)]

    def flat(name: str, dtype: type) -> np.ndarray:
        parts = [getattr(log, name).view() for log in logs]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    cols = StepColumns(
        ep_steps=np.array([len(log) for log in logs], np.int64),
        obs=joined("obs"), act=joined("act"), info=joined("info"),
        reward=np.array(joined("reward"), np.float64), valid=np.array(joined("valid"), np.uint8),
        done=np.array(joined("done"), np.uint8), pv=np.array(joined("pv"), np.int64),
        p_len=np.array(joined("p_len"), np.int64), q_len=np.array(joined("q_len"), np.int64),
        p=flat("p", np.int32), q=flat("q", np.int32), lp=flat("lp", np.float32),
    )
    eps, at = [], 0
    for log, given in zip(logs, episodes, strict=True):
        unknown = set(given) - set(_EPISODE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown EpisodeRecord fields {sorted(unknown)}")
        eps.append(EpisodeRecord._lazy(cols, at, at + len(log), **{**_EPISODE_DEFAULTS, **given}))
        at += len(log)
    return GroupRecord(episodes=eps, **group)


def __getattr__(name: str) -> Any:
    """``encode_group``, ``decode_group`` and ``validate_group`` live in :mod:`services.codec`."""
    if name in ("encode_group", "decode_group", "validate_group"):
        from services import codec

        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
