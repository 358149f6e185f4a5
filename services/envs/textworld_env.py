"""TextWorld adapter: games generated offline with TextWorld's own challenges (``tw-make``).

``cfg.game`` is one of ``simple``, ``coin_collector``, ``treasure_hunter``,
``cooking``; challenge settings come from ``cfg.options["settings"]`` (a dict)
or ``cfg.game_params`` (``"level=3"``; the EnvConfig default, which is a
TextWorldExpress string, is ignored here). A task is (challenge, settings,
split, seed); the game file for it is generated once with the Inform 7
compiler shipped in the wheel (2-5 s) and cached under
``cfg.options["cache_dir"]`` (default ``~/.cache/proxmo/textworld``), so a
rollout worker replaying the same task loads the same ``.z8`` file.

Splits: disjoint seed ranges (train 0-9999, dev 10000-19999, test 20000-29999);
``cooking`` also passes the split to the challenge (its own recipe folds) and
``simple`` draws test games from its test distribution.
Won/lost come from the game; ``score`` is points / max points. The expert is
the game's walkthrough (falling back to the engine's ``policy_commands``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from services.config import EnvConfig
from services.envs.base import Task, TaskError, TextEnv, sample_from

log = logging.getLogger(__name__)

CHALLENGES = ("simple", "coin_collector", "treasure_hunter", "cooking")
_SPLIT_BASE = {"train": 0, "dev": 10_000, "valid": 10_000, "test": 20_000}
_SPLIT_SIZE = 10_000
_DEFAULTS: dict[str, dict[str, Any]] = {
    "simple": {"rewards": "dense", "goal": "detailed", "test": False},
    "coin_collector": {"level": 3},
    "treasure_hunter": {"level": 3},
    "cooking": {"recipe": 1, "take": 1, "go": 1, "open": False, "cook": False, "cut": False,
                "drop": False, "recipe_seed": 0, "split": "train"},
}
_GEN_LOCK = threading.Lock()  # game generation touches global TextWorld state


def _default_game_params() -> str:
    return next(f.default for f in fields(EnvConfig) if f.name == "game_params")


def _parse_params(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in item:
            raise TaskError(f"game_params item {item!r} is not key=value")
        k, v = item.split("=", 1)
        v = v.strip()
        low = v.lower()
        out[k.strip()] = (low == "true") if low in ("true", "false") else int(v) if v.lstrip("-").isdigit() else v
    return out


def challenge_settings(cfg: EnvConfig) -> dict[str, Any]:
    if cfg.game not in CHALLENGES:
        raise TaskError(f"env.game {cfg.game!r} is not a TextWorld challenge; known: {', '.join(CHALLENGES)}")
    settings = dict(_DEFAULTS[cfg.game])
    given = dict(cfg.options.get("settings", {}))
    if not given and cfg.game_params and cfg.game_params != _default_game_params():
        given = _parse_params(cfg.game_params)
    unknown = sorted(set(given) - set(settings))
    if unknown:
        raise TaskError(f"unknown {cfg.game} setting(s) {unknown}; known: {sorted(settings)}")
    settings.update(given)
    return settings


def generate_game(challenge: str, settings: dict[str, Any], seed: int, cache_dir: Path) -> Path:
    """Generate (or find in the cache) the compiled game for (challenge, settings, seed)."""
    key = json.dumps({"c": challenge, "s": settings, "seed": seed}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = cache_dir / f"{challenge}-{seed}-{digest}.z8"
    if path.exists() and path.with_suffix(".json").exists():
        return path
    import textworld
    import textworld.challenges
    from textworld.generator import compile_game

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _GEN_LOCK:
        options = textworld.GameOptions()
        options.seeds = seed
        options.path = str(path)
        options.file_ext = ".z8"
        options.force_recompile = True
        _, make, _ = textworld.challenges.CHALLENGES[f"tw-{challenge}"]
        game = make(dict(settings), options)
        tmp = compile_game(game, options)
        if Path(tmp) != path:
            os.replace(tmp, path)
    return path


class TextWorldEnv(TextEnv):
    name = "textworld"
    family = "textworld"

    def __init__(self, cfg: EnvConfig) -> None:
        super().__init__(cfg)
        self.settings = challenge_settings(cfg)
        default_cache = Path(os.path.expanduser("~/.cache/proxmo/textworld"))
        self.cache_dir = Path(cfg.options.get("cache_dir") or default_cache)
        self._env = None
        self._walkthrough: list[str] | None = None
        self._max_score = 1.0

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        if split not in _SPLIT_BASE:
            raise TaskError(f"unknown split {split!r} for textworld; use one of {sorted(_SPLIT_BASE)}")
        base = _SPLIT_BASE[split]
        seeds = sample_from(range(base, base + _SPLIT_SIZE), n, seed)  # type: ignore[arg-type]
        norm = "dev" if split == "valid" else split
        return [Task(self.name, f"{self.cfg.game}/{norm}/{s}", int(s), norm, self.cfg.game) for s in seeds]

    def _game_path(self, task: Task) -> Path:
        settings = dict(self.settings)
        if self.cfg.game == "cooking":
            settings["split"] = {"dev": "valid"}.get(task.split, task.split)
        elif self.cfg.game == "simple":
            settings["test"] = task.split == "test"
        return generate_game(self.cfg.game, settings, int(task.seed), self.cache_dir)

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        import textworld

        if task.split not in _SPLIT_BASE:
            raise TaskError(f"unknown split {task.split!r}")
        path = self._game_path(task)
        self._close_game()
        infos = textworld.EnvInfos(admissible_commands=True, won=True, lost=True, score=True,
                                   max_score=True, objective=True, policy_commands=True,
                                   extras=["walkthrough"])
        self._env = textworld.start(str(path), request_infos=infos)
        state = self._env.reset()
        self._max_score = float(state.get("max_score") or 1.0) or 1.0
        walk = state.get("extra.walkthrough")
        self._walkthrough = list(walk) if walk else list(state.get("policy_commands") or []) or None
        return state["feedback"], {"admissible_actions": _sorted_cmds(state), "task_type": self.cfg.game,
                                   "task_description": str(state.get("objective") or ""),
                                   "score": 0.0}

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        state, score, done = self._env.step(action)
        return state["feedback"], {"admissible_actions": _sorted_cmds(state),
                                   "score": float(score) / self._max_score,
                                   "won": bool(state.get("won")), "lost": bool(state.get("lost")),
                                   "done": bool(done)}

    def expert_actions(self) -> list[str] | None:
        return list(self._walkthrough) if self._walkthrough else None

    def _close_game(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env = None

    def close(self) -> None:
        self._close_game()


def _sorted_cmds(state: Any) -> list[str]:
    # TextWorld already returns them sorted; sorting again keeps the prompt stable across versions.
    return sorted(state.get("admissible_commands") or [])
