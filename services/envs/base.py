"""The one interface every multi-turn text environment implements, and its registry.

A rollout worker only ever sees :class:`TextEnv`: it samples :class:`Task` s,
resets one environment per group member with the *same* task (so every member
starts from a byte-identical observation), and steps it with the parsed action.
The raw observation string is the anchor state for step grouping, so adapters
never decorate it.

Reward follows the paper: ``10.0`` on the step where the task is won, else
``0.0``. The environment's own score goes to ``info["score"]``.

Adapters are registered by name at import time of :mod:`services.envs`; a
``"module:attr"`` string names a class (or factory) anywhere else and is
imported lazily (STYLE.md 4).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.config import EnvConfig
from services.envs.protocol import resolve_choice

log = logging.getLogger(__name__)

WIN_REWARD = 10.0  # paper convention: 10 at the winning step, 0 otherwise


class EnvInfraError(RuntimeError):
    """The environment itself broke (exception, timeout, dead JVM): not a task failure."""


class TaskError(ValueError):
    """Bad input from the caller (unknown split, a task for another env...)."""


@dataclass(frozen=True)
class Task:
    """Everything needed to rebuild the identical starting state on any worker."""

    env_name: str
    task_id: str
    seed: int
    split: str
    task_type: str = ""


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class TextEnv(ABC):
    """Base class: adapters implement ``_reset`` / ``_step`` / ``sample_tasks``.

    The base class owns what must be identical across adapters: the reward
    convention, the step cap (``cfg.max_steps``; reaching it ends the episode with
    ``info["truncated"] = True``), and case-insensitive matching of the parsed
    (lowercased) action to the environment's own spelling of an admissible action
    (TextWorldExpress writes "T-shirt"; the paper's parser lowercases).
    """

    name: str = ""
    family: str = "generic"  # prompt template family (services.envs.protocol)

    def __init__(self, cfg: EnvConfig) -> None:
        self.cfg = cfg
        self.task: Task | None = None
        self._steps = 0
        self._done = True
        self._admissible: list[str] = []
        self._canon: dict[str, str] = {}
        self._score = 0.0

    # ---------------------------------------------------------------- adapter hooks

    @abstractmethod
    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split``, a deterministic function of ``seed``."""

    @abstractmethod
    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        """Start ``task``; info must hold admissible_actions, task_description, task_type."""

    @abstractmethod
    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        """Apply the env's own spelling of ``action``; info must hold score, won, lost, admissible_actions."""

    def expert_actions(self) -> list[str] | None:
        """Gold path / walkthrough / expert plan for the current task (None if there is none)."""
        return None

    def close(self) -> None:
        """Release processes (JVMs, games); safe to call twice."""
        return None

    def kill(self) -> None:
        """Hard stop from another thread (a hung or broken env): kill processes first, then close."""
        self.close()

    # ---------------------------------------------------------------- public API

    def reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        if not isinstance(task, Task):
            raise TaskError(f"reset() needs a Task, got {type(task).__name__}")
        if task.env_name != self.name:
            raise TaskError(f"task {task.task_id!r} belongs to env {task.env_name!r}, not {self.name!r}")
        obs, info = self._reset(task)
        self.task = task
        self._steps = 0
        self._done = False
        self._score = float(info.get("score", 0.0))
        self._set_admissible(info.get("admissible_actions", []))
        info["admissible_actions"] = list(self._admissible)
        info.setdefault("task_type", task.task_type)
        info.setdefault("task_description", "")
        return obs, info

    def step(self, action: str) -> StepResult:
        if self.task is None:
            raise TaskError("step() before reset()")
        if self._done:
            raise TaskError("step() after the episode ended; call reset()")
        action = (action or "").strip()
        # env.action_format=index: a listed number plays that action (the list the prompt showed).
        chosen = resolve_choice(action, self._admissible) if self.cfg.action_format == "index" else None
        choice = None
        if chosen is not None:
            choice, action = int(action), chosen
        was_admissible = self.is_admissible(action.lower())
        projected_from = None
        if was_admissible is False and self.cfg.action_projection == "nearest":
            nearest = nearest_action(action.lower(), self._admissible, self.cfg.projection_min_ratio)
            if nearest is not None:
                projected_from, action = action, nearest
        raw = self._canon.get(action.lower(), action)
        obs, info = self._step(raw)
        self._steps += 1
        won = bool(info.get("won", False))
        lost = bool(info.get("lost", False))
        truncated = not (won or lost) and self._steps >= self.cfg.max_steps
        self._done = won or lost or truncated or bool(info.get("done", False))
        self._set_admissible(info.get("admissible_actions", []))
        info.update(
            won=won,
            lost=lost,
            truncated=truncated,
            admissible=was_admissible,  # None when the env gives no action list
            admissible_actions=list(self._admissible),
            task_type=self.task.task_type,
            steps=self._steps,
        )
        info.setdefault("score", 0.0)
        info.pop("done", None)
        previous, self._score = self._score, float(info["score"])
        if projected_from is not None:
            info.update(projected_from=projected_from, action=action)
        elif choice is not None:
            info.update(choice=choice, action=action)
        if self.cfg.reward == "score":
            reward = WIN_REWARD * (self._score - previous)
        else:
            reward = WIN_REWARD if won else 0.0
        return StepResult(obs, reward, self._done, info)

    def is_admissible(self, action: str) -> bool | None:
        """Whether the lowercased ``action`` is in the current list (None: the env gives no list)."""
        return (action in self._canon) if self._canon else None

    @property
    def steps(self) -> int:
        return self._steps

    # ---------------------------------------------------------------- helpers

    def _set_admissible(self, actions: list[str]) -> None:
        self._admissible = [a.lower() for a in actions]
        self._canon = {a.lower(): a for a in actions}

    def __enter__(self) -> TextEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nearest_action(text: str, actions: list[str], min_ratio: float = 0.0) -> str | None:
    """The action of ``actions`` most similar to ``text`` (difflib ratio; ties go to the earlier one).

    None when ``actions`` is empty or the best ratio is below ``min_ratio``.
    """
    best, best_ratio = None, -1.0
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(text)
    for a in actions:
        matcher.set_seq1(a)
        r = matcher.ratio()
        if r > best_ratio:
            best, best_ratio = a, r
    return best if best is not None and best_ratio >= min_ratio else None


class JvmEnvMixin:
    """``kill``/``close`` for adapters whose simulator runs in a py4j JVM (``self._sim``).

    The adapter sets ``self._closed = False`` and names itself in ``_sim_label``.
    """

    _sim_label = "the simulator"

    def kill(self) -> None:
        # A frozen JVM also freezes py4j's polite shutdown: kill the process first.
        try:
            self._sim._gateway.java_process.kill()
        except Exception as exc:  # noqa: BLE001 - already dead
            log.debug("killing the JVM: %s", exc)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sim.close()
        except Exception as exc:  # noqa: BLE001 - the JVM may already be gone
            log.debug("closing %s: %s", self._sim_label, exc)
        try:  # the simulator's __del__ closes again and prints a BrokenPipeError to stderr at exit
            self._sim.close = lambda *a, **k: None
        except AttributeError:
            pass


def sample_from(pool: list[Any], n: int, seed: int) -> list[Any]:
    """``n`` items from ``pool`` chosen by ``seed`` (with replacement only when n > len(pool))."""
    if n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    if not pool:
        raise TaskError("no tasks available for this split")
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, str | Callable[[EnvConfig], TextEnv]] = {}


def register_env(name: str, factory: str | Callable[[EnvConfig], TextEnv]) -> None:
    """Register ``factory`` (a TextEnv subclass, a callable, or a lazy "module:attr") under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = factory


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def _import_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise TaskError(f"{target!r} is not of the form 'module:attr'")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise TaskError(f"cannot import {module!r} for environment {target!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TaskError(f"{module!r} has no attribute {attr!r}") from exc
    return obj


def resolve_factory(name: str) -> Callable[[EnvConfig], TextEnv]:
    if name in _REGISTRY:
        target = _REGISTRY[name]
        return _import_target(target) if isinstance(target, str) else target
    if ":" in name:
        return _import_target(name)
    raise TaskError(f"unknown environment {name!r}; known: {', '.join(list_envs())} (or 'module:attr')")


def make_env(cfg: EnvConfig, guarded: bool = False) -> TextEnv:
    """Create the environment named by ``cfg.name``.

    ``guarded=True`` wraps it in :class:`~services.envs.guarded.GuardedEnv` with
    ``cfg.step_timeout_s``, so failures surface as :class:`EnvInfraError`.
    """
    factory = resolve_factory(cfg.name)
    if guarded:
        from services.envs.guarded import GuardedEnv

        return GuardedEnv(lambda: factory(cfg), cfg.step_timeout_s)  # type: ignore[return-value]
    env = factory(cfg)
    if not isinstance(env, TextEnv):
        raise TaskError(f"{cfg.name!r} built a {type(env).__name__}, not a TextEnv")
    return env
