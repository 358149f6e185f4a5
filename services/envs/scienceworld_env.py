"""ScienceWorld adapter (30 tasks; train / dev / test variations).

``cfg.game`` is a task name (e.g. ``boil``, ``find-living-thing``), a comma
list, or ``all``; ``cfg.options["simplifications"]`` defaults to ``"easy"``.
A task is (task name, split, variation). Won = the simulator marks the task
completed with score 100; lost = a negative score (ScienceWorld's failure
signal). ``info["score"]`` is the simulator's score / 100.

The valid-action list is what makes ScienceWorld slow (3-50 steps/s with it,
40-190 without), so it is (a) optional: ``options["valid_actions"] = false``
gives an empty admissible list, and (b) cached: the simulator is deterministic,
so the list after a given action prefix of a given variation is the same for
every group member and every epoch; it is kept in an LRU cache keyed by that
prefix (``options["valid_cache"]`` entries, default 4096).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import fields
from typing import Any

from services.config import EnvConfig
from services.envs.base import JvmEnvMixin, Task, TaskError, TextEnv, sample_from

log = logging.getLogger(__name__)

_SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "test": "test"}


def _default_game() -> str:
    return next(f.default for f in fields(EnvConfig) if f.name == "game")


class ScienceWorldEnv(JvmEnvMixin, TextEnv):
    _sim_label = "ScienceWorld"
    name = "scienceworld"
    family = "scienceworld"

    def __init__(self, cfg: EnvConfig) -> None:
        super().__init__(cfg)
        from scienceworld import ScienceWorldEnv as _Sim

        self._sim = _Sim("", envStepLimit=max(1000, cfg.max_steps + 1))
        known = list(self._sim.get_task_names())
        spec = cfg.game if cfg.game and cfg.game != _default_game() else "all"
        self.tasks = known if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
        bad = [t for t in self.tasks if t not in known]
        if bad:
            self.close()
            raise TaskError(f"unknown ScienceWorld task(s) {bad}; known: {', '.join(known)}")
        self.simplifications = str(cfg.options.get("simplifications", "easy"))
        self.use_valid = bool(cfg.options.get("valid_actions", True))
        self._cache: OrderedDict[tuple, list[str]] = OrderedDict()
        self._cache_size = int(cfg.options.get("valid_cache", 4096))
        self.cache_hits = 0
        self._loaded: tuple[str, int] | None = None
        self._prefix: tuple[str, ...] = ()
        self._gold: list[str] | None = None
        self._closed = False

    def _variations(self, task: str, fold: str) -> list[int]:
        self._sim.load(task, 0, self.simplifications)
        getter = {"train": self._sim.get_variations_train, "dev": self._sim.get_variations_dev,
                  "test": self._sim.get_variations_test}[fold]
        self._loaded = None
        return [int(v) for v in getter()]

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        if split not in _SPLITS:
            raise TaskError(f"unknown split {split!r} for scienceworld; use one of {sorted(_SPLITS)}")
        fold = _SPLITS[split]
        picks = sample_from([(i % len(self.tasks)) for i in range(max(n, len(self.tasks)))], n, seed)
        pools: dict[str, list[int]] = {}
        tasks = []
        for j, i in enumerate(picks):
            name = self.tasks[i]
            if name not in pools:
                pools[name] = self._variations(name, fold)
            var = sample_from(pools[name], 1, seed * 7919 + j)[0]
            tasks.append(Task(self.name, f"{name}/{fold}/{var}", var, fold, name))
        return tasks

    def _valid(self) -> list[str]:
        if not self.use_valid:
            return []
        key = (self._loaded, self.simplifications, self._prefix)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return self._cache[key]
        valid = sorted(self._sim.get_valid_action_object_combinations())
        self._cache[key] = valid
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return valid

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        if task.task_type not in self.tasks:
            raise TaskError(f"task type {task.task_type!r} is not enabled (env.game={self.cfg.game!r})")
        key = (task.task_type, int(task.seed))
        if self._loaded != key:
            self._sim.load(task.task_type, int(task.seed), self.simplifications, generateGoldPath=True)
            self._gold = [str(a) for a in self._sim.get_gold_action_sequence()]
            self._loaded = key
        self._sim.server.reset()
        self._prefix = ()
        obs = self._sim.server.step("look around")  # what ScienceWorld's own reset() returns
        return obs, {"admissible_actions": self._valid(), "task_type": task.task_type,
                     "task_description": str(self._sim.get_task_description()), "score": 0.0}

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        # Talk to the simulator directly: its Python step() always builds the slow valid list.
        obs = self._sim.server.step(action)
        score = float(self._sim.server.getScore())
        completed = bool(self._sim.server.getCompleted())
        self._prefix = self._prefix + (action,)
        won = completed and score >= 1.0
        lost = score < 0 or (completed and not won)
        return obs, {"admissible_actions": self._valid(), "score": score, "won": won, "lost": lost}

    def expert_actions(self) -> list[str] | None:
        return list(self._gold) if self._gold else None

