"""TextWorldExpress adapter (all eight game families, train/dev/test folds).

Splits: ``train``, ``dev`` (alias ``valid``) and ``test`` are the simulator's
folds, minus one thing: every fifth seed of the train fold (20%) is held out as
the ``heldout`` split and never sampled as ``train``. The dev and test folds of
some families use objects the train fold never shows (``twc`` is about where
objects belong, so a small model cannot know unseen ones); ``heldout`` measures
generalisation to unseen *games* of the same family, as the quick start needs.

The game family is ``cfg.game`` and its generation parameters ``cfg.game_params``
(e.g. ``numLocations=1,numItemsToPutAway=2,includeDoors=0``). A task is a
(fold, seed) pair of that game; TextWorldExpress generates the same world for
the same seed, so every group member sees a byte-identical first observation.
Won = the game's ``tasksuccess``; lost = ``taskfailure``; ``score`` is the
game's normalized score in [0, 1]. Gold paths come from the simulator
(``generateGoldPath=True``).
"""

from __future__ import annotations

import logging
from typing import Any

from services.config import EnvConfig
from services.envs.base import JvmEnvMixin, Task, TaskError, TextEnv, sample_from

log = logging.getLogger(__name__)

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
_SPLITS = {"train": "train", "heldout": "train", "dev": "dev", "valid": "dev", "test": "test"}
HELDOUT_EVERY = 5  # seeds at positions 4, 9, 14, ... of the sorted train fold form the heldout split


class TextWorldExpressEnv(JvmEnvMixin, TextEnv):
    _sim_label = "TextWorldExpress"
    name = "textworldexpress"
    family = "textworldexpress"

    def __init__(self, cfg: EnvConfig, simulator: Any = None) -> None:
        """``simulator``: an already running TextWorldExpress JVM to reuse (switching games is cheap)."""
        super().__init__(cfg)
        if cfg.game not in GAMES:
            raise TaskError(f"env.game {cfg.game!r} is not a TextWorldExpress game; known: {', '.join(GAMES)}")
        if simulator is None:
            from textworld_express import TextWorldExpressEnv as _Sim

            # The simulator's own step limit is set high: the step cap is ours (cfg.max_steps).
            simulator = _Sim(envStepLimit=max(1000, cfg.max_steps + 1))
        self._sim = simulator
        self._sim.load(cfg.game, cfg.game_params)
        self._seeds: dict[str, list[int]] = {}
        self._gold: list[str] | None = None
        self._closed = False

    def _fold(self, split: str) -> str:
        if split not in _SPLITS:
            raise TaskError(f"unknown split {split!r} for textworldexpress; use one of {sorted(_SPLITS)}")
        return _SPLITS[split]

    def _ensure_loaded(self) -> None:
        # A shared simulator may hold another game: switch back to ours first.
        if (self._sim.gameName, self._sim.gameParams) != (self.cfg.game, self.cfg.game_params):
            self._sim.load(self.cfg.game, self.cfg.game_params)

    def _fold_seeds(self, fold: str) -> list[int]:
        if fold not in self._seeds:
            self._ensure_loaded()
            getter = {"train": self._sim.getValidSeedsTrain, "dev": self._sim.getValidSeedsDev,
                      "test": self._sim.getValidSeedsTest}[fold]
            self._seeds[fold] = sorted(int(s) for s in getter())
        return self._seeds[fold]

    def split_seeds(self, split: str) -> list[int]:
        """The simulator seeds a split draws from (``train`` and ``heldout`` are disjoint)."""
        fold = self._fold(split)
        seeds = self._fold_seeds(fold)
        if fold != "train":
            return seeds
        held = split == "heldout"
        return [s for i, s in enumerate(seeds) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        fold = self._fold(split)
        seeds = sample_from(self.split_seeds(split), n, seed)
        return [Task(self.name, f"{self.cfg.game}/{fold}/{s}", int(s), fold, self.cfg.game) for s in seeds]

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        fold = self._fold(task.split)
        self._ensure_loaded()
        obs, info = self._sim.reset(seed=int(task.seed), gameFold=fold, generateGoldPath=True)
        self._gold = [str(a) for a in self._sim.getGoldActionSequence()]
        return obs, {"admissible_actions": list(info["validActions"]),
                     "task_description": str(info.get("taskDescription", "")),
                     "task_type": self.cfg.game, "score": float(info["score"])}

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        obs, _, _, info = self._sim.step(action)
        return obs, {"admissible_actions": list(info["validActions"]), "score": float(info["score"]),
                     "won": bool(info["tasksuccess"]), "lost": bool(info["taskfailure"])}

    def expert_actions(self) -> list[str] | None:
        return list(self._gold) if self._gold is not None else None


    @property
    def simulator(self) -> Any:
        return self._sim

    @property
    def java_process(self):
        """The simulator's JVM (fault-injection tests kill it)."""
        return self._sim._gateway.java_process
