"""ALFWorld adapter: the real benchmark from ``$ALFWORLD_DATA``, or games generated offline.

Two sources behind one adapter (``cfg.options["source"]``):

* ``benchmark`` (default when the data is there): the games fetched by
  ``alfworld-download`` under ``cfg.data_path`` or ``$ALFWORLD_DATA``:
  ``json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/{game.tw-pddl,traj_data.json}``.
  As in ALFWorld's own loader, games marked unsolvable and "movable"/"Sliced"
  trials are skipped. A task id is the trial folder relative to the data root.
* ``generated``: ALFRED-domain games built from the layouts, affordances and
  goal templates in the ``alfworld`` wheel (:mod:`services.envs.alfworld_gen`),
  cached under ``cfg.options["cache_dir"]`` (default ``~/.cache/proxmo/alfworld``).

Both run in ALFWorld's text engine (TextWorld's PDDL backend) with ALFWorld's
demangler (object names such as "apple 1"). Task types are reported with the
paper's short names: pick, look, clean, heat, cool, pick2 (``cfg.game``: one of
them, a comma list, or ``all``). Won is the engine's goal check; ``score`` is 1
on a win, else 0 (ALFWorld has no partial score).

Expert: the game's stored walkthrough (generated games), else the PDDL
planner's plan from the start state (``options["expert"] = "planner"``), or
ALFWorld's hand-coded expert played out in a private copy of the game
(``"handcoded"``).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

from services.config import EnvConfig
from services.envs import alfworld_gen as gen
from services.envs.base import Task, TaskError, TextEnv, sample_from

log = logging.getLogger(__name__)

SPLITS = ("train", "valid_seen", "valid_unseen")
_SPLIT_ALIASES = {"dev": "valid_seen", "valid": "valid_seen", "test": "valid_unseen"}
_SPLIT_SEED_BASE = {"train": 0, "valid_seen": 100_000, "valid_unseen": 200_000}
_TASK_MARK = "Your task is to: "


def _default_game() -> str:
    return next(f.default for f in fields(EnvConfig) if f.name == "game")


def task_types_of(cfg: EnvConfig) -> list[str]:
    spec = str(cfg.options.get("task_types") or cfg.game or "all")
    if spec in ("all", _default_game()):  # the EnvConfig default names a TextWorldExpress game
        return list(gen.TASK_TYPES)
    types = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in types if t not in gen.TASK_TYPES]
    if bad:
        raise TaskError(f"unknown ALFWorld task type(s) {bad}; known: {', '.join(gen.TASK_TYPES)} or 'all'")
    return types


def data_root(cfg: EnvConfig) -> Path | None:
    raw = cfg.data_path or os.environ.get("ALFWORLD_DATA", "")
    return Path(os.path.expanduser(raw)) if raw else None


def index_benchmark(root: Path, split: str) -> list[tuple[str, str]]:
    """[(trial folder relative to root, short task type)] of the solvable games of ``split``."""
    base = root / "json_2.1.1" / split
    if not base.is_dir():
        raise TaskError(f"ALFWorld data not found: {base} does not exist (run `alfworld-download` "
                        "and set ALFWORLD_DATA or env.data_path, or use options.source=generated)")
    out = []
    for traj in sorted(base.glob("*/*/traj_data.json")):
        trial = traj.parent
        if "movable" in str(trial) or "Sliced" in str(trial) or not (trial / "game.tw-pddl").exists():
            continue
        try:
            ttype = json.loads(traj.read_text())["task_type"]
            solvable = json.loads((trial / "game.tw-pddl").read_text()).get("solvable", False)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping unreadable ALFWorld game %s: %s", trial, exc)
            continue
        if solvable and ttype in gen.SHORT_NAME:
            out.append((str(trial.relative_to(root)), gen.SHORT_NAME[ttype]))
    return out


class AlfWorldEnv(TextEnv):
    name = "alfworld"
    family = "alfworld"

    def __init__(self, cfg: EnvConfig) -> None:
        super().__init__(cfg)
        self.types = task_types_of(cfg)
        self.root = data_root(cfg)
        source = cfg.options.get("source")
        if source is None:
            source = "benchmark" if self.root and (self.root / "json_2.1.1").is_dir() else "generated"
        if source not in ("benchmark", "generated"):
            raise TaskError(f"options.source must be benchmark|generated, got {source!r}")
        if source == "benchmark" and self.root is None:
            raise TaskError("ALFWorld benchmark needs ALFWORLD_DATA or env.data_path")
        self.source = source
        self.cache_dir = Path(cfg.options.get("cache_dir") or os.path.expanduser("~/.cache/proxmo/alfworld"))
        self.expert_type = str(cfg.options.get("expert", "planner"))
        if self.expert_type not in ("planner", "handcoded"):
            raise TaskError(f"options.expert must be planner|handcoded, got {self.expert_type!r}")
        self._index: dict[str, list[tuple[str, str]]] = {}
        self._env = None
        self._path: Path | None = None

    # ------------------------------------------------------------ tasks

    @staticmethod
    def _split(split: str) -> str:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise TaskError(f"unknown ALFWorld split {split!r}; use one of {SPLITS}")
        return split

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        split = self._split(split)
        if self.source == "benchmark":
            if split not in self._index:
                self._index[split] = index_benchmark(self.root, split)
            pool = [(i, rel, t) for i, (rel, t) in enumerate(self._index[split]) if t in self.types]
            return [Task(self.name, rel, i, split, t) for i, rel, t in sample_from(pool, n, seed)]
        # Generated: task types in turn (balanced), game seeds drawn per split.
        rng = random.Random(seed)
        base = _SPLIT_SEED_BASE[split]
        offset = rng.randrange(len(self.types))
        tasks = []
        for i in range(n):
            t = self.types[(offset + i) % len(self.types)]
            s = base + rng.randrange(100_000)
            tasks.append(Task(self.name, f"gen/{split}/{t}/{s}", s, split, t))
        return tasks

    def game_path(self, task: Task) -> Path:
        if task.task_type not in gen.TASK_TYPES:
            raise TaskError(f"unknown ALFWorld task type {task.task_type!r}")
        split = self._split(task.split)
        if task.task_id.startswith("gen/"):
            return gen.generate(self.cache_dir, split, task.task_type, int(task.seed))
        if self.root is None:
            raise TaskError("benchmark task given but no ALFWorld data root is configured")
        path = (self.root / task.task_id / "game.tw-pddl").resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            raise TaskError(f"no ALFWorld game at {task.task_id!r} under {self.root}")
        return path

    # ------------------------------------------------------------ episode

    def _start(self, path: Path, **infos: Any):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        request = textworld.EnvInfos(admissible_commands=True, won=True, extras=["gamefile"], **infos)
        return textworld.start(str(path), request_infos=request, wrappers=[AlfredDemangler(shuffle=False),
                                                                          AlfredInfos])

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        path = self.game_path(task)
        if path != self._path or self._env is None:
            self._close_game()
            self._env = self._start(path)
            self._path = path
        state = self._env.reset()
        obs = state["feedback"]
        desc = obs.split(_TASK_MARK, 1)[1].strip() if _TASK_MARK in obs else ""
        return obs, {"admissible_actions": _cmds(state), "task_description": desc,
                     "task_type": task.task_type, "score": 0.0}

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        state, _, done = self._env.step(action)
        won = bool(state.get("won"))
        return state["feedback"], {"admissible_actions": _cmds(state), "won": won,
                                   "score": 1.0 if won else 0.0, "done": bool(done)}

    def expert_actions(self) -> list[str] | None:
        if self._path is None:
            return None
        if self.expert_type == "planner":
            walk = json.loads(self._path.read_text()).get("walkthrough")
            if walk:
                return list(walk)
            env = self._start(self._path, policy_commands=True)
            try:
                return list(env.reset().get("policy_commands") or []) or None
            finally:
                env.close()
        return self._handcoded_plan()

    def _handcoded_plan(self, limit: int = 100) -> list[str] | None:
        """Play ALFWorld's hand-coded expert in a private copy of the game; its actions if it wins."""
        from alfworld.agents.environment.alfred_tw_env import AlfredExpert, AlfredExpertType

        env = self._start(self._path, facts=True)
        env = AlfredExpert(env, expert_type=AlfredExpertType.HANDCODED)
        env.load(str(self._path))
        try:
            state = env.reset()
            actions: list[str] = []
            for _ in range(limit):
                cmd = state["extra.expert_plan"][0]
                actions.append(cmd)
                state, _, done = env.step(cmd)
                if done:
                    break
            return actions if state.get("won") else None
        finally:
            env.close()

    def _close_game(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env, self._path = None, None

    def close(self) -> None:
        self._close_game()


def _cmds(state: Any) -> list[str]:
    return [c for c in (state.get("admissible_commands") or []) if c != "help"]
