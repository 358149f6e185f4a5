"""WebShop adapter: a user's WebShop installation, or the project's own small catalogue.

Backends (``cfg.options["backend"]``):

* ``webshop``: WebShop's text environment (``web_agent_site.envs.WebAgentTextEnv``,
  ``observation_mode="text"``) from the WebShop repository at ``cfg.data_path``
  (with its product data and search index set up as its README describes; see
  ``services/envs/README.md``). ``options["num_products"]`` is passed through.
* ``catalog`` (default when ``cfg.data_path`` is empty): :class:`MiniShop`, a
  WebShop-compatible shop over a catalogue generated here, so the adapter, the
  protocol and the experts run in CI.

Both are driven through the same four calls (``reset(session)``, ``step``,
``get_available_actions``, ``get_instruction_text``). A task is a goal index
("session"); splits follow WebShop's convention: test = goals 0-499, dev =
500-1499, train = the rest (scaled by 1/10 for the small catalogue).

The paper's score/success split: ``info["score"]`` is WebShop's purchase reward
in [0, 1] (the "score" column, x100 in tables); ``info["won"]`` is
``reward == 1`` (the "success" column) and only then is the RL reward 10.
Buying anything else ends the episode as lost. Admissible actions are the page's
clickables as ``click[...]`` plus ``search[<query>]`` when the page has a
search bar (any query is accepted there).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from services.config import EnvConfig
from services.envs.base import Task, TaskError, TextEnv, sample_from
from services.envs.webshop_catalog import MiniShop

log = logging.getLogger(__name__)

SEARCH_PLACEHOLDER = "search[<query>]"
_SPLITS = {"train", "dev", "test"}


def split_range(split: str, n_goals: int, scale: int) -> range:
    """WebShop's goal-index folds: test [0, 500), dev [500, 1500), train [1500, n) (divided by ``scale``)."""
    test_end, dev_end = 500 // scale, 1500 // scale
    if split == "test":
        return range(0, min(test_end, n_goals))
    if split == "dev":
        return range(test_end, min(dev_end, n_goals))
    if split == "train":
        return range(dev_end, n_goals)
    raise TaskError(f"unknown split {split!r} for webshop; use train, dev or test")


class WebShopEnv(TextEnv):
    name = "webshop"
    family = "webshop"

    def __init__(self, cfg: EnvConfig) -> None:
        super().__init__(cfg)
        backend = cfg.options.get("backend") or ("webshop" if cfg.data_path else "catalog")
        if backend == "catalog":
            self.shop: Any = MiniShop(seed=int(cfg.options.get("catalog_seed", 0)),
                                      n_products=int(cfg.options.get("num_products", 120)),
                                      n_goals=int(cfg.options.get("num_goals", 200)))
            self.n_goals, self.scale = len(self.shop.goals), 10
        elif backend == "webshop":
            self.shop = _load_webshop(cfg)
            self.n_goals, self.scale = len(self.shop.server.goals), 1
        else:
            raise TaskError(f"options.backend must be catalog|webshop, got {backend!r}")
        self.backend = backend
        self._session: int | None = None

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        idx = sample_from(list(split_range(split, self.n_goals, self.scale)), n, seed)
        return [Task(self.name, f"{split}/{i}", int(i), split, self._category(int(i))) for i in idx]

    def _category(self, i: int) -> str:
        if self.backend == "catalog":
            return self.shop.goals[i].category
        goal = self.shop.server.goals[i]
        return str(goal.get("category", "")) if isinstance(goal, dict) else ""

    def _actions(self) -> list[str]:
        avail = self.shop.get_available_actions()
        acts = [SEARCH_PLACEHOLDER] if avail.get("has_search_bar") else []
        return acts + [f"click[{c}]" for c in avail.get("clickables", []) if c != "search"]

    def is_admissible(self, action: str) -> bool | None:
        if action.startswith("search[") and action.endswith("]") and len(action) > len("search[]"):
            return SEARCH_PLACEHOLDER in self._admissible
        return super().is_admissible(action)

    def _reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        if task.seed not in split_range(task.split, self.n_goals, self.scale):
            raise TaskError(f"goal {task.seed} is not in the {task.split} split")
        obs, _ = self.shop.reset(session=int(task.seed))
        self._session = int(task.seed)
        instr = self.shop.get_instruction_text()
        desc = instr.split("[SEP]", 1)[-1].strip() if "[SEP]" in instr else instr
        return obs, {"admissible_actions": self._actions(), "task_description": desc,
                     "task_type": task.task_type, "score": 0.0}

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        obs, reward, done, _ = self.shop.step(action)
        reward = float(reward or 0.0)
        won = bool(done) and reward >= 1.0 - 1e-9
        return obs, {"admissible_actions": [] if done else self._actions(), "score": reward,
                     "won": won, "lost": bool(done) and not won, "done": bool(done)}

    def expert_actions(self) -> list[str] | None:
        # WebShop's own human demonstrations are a separate download; only the catalogue has an expert.
        if self.backend != "catalog" or self._session is None:
            return None
        return self.shop.expert(self._session)

    def close(self) -> None:
        if self.backend == "webshop":
            try:
                self.shop.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing WebShop: %s", exc)


def _load_webshop(cfg: EnvConfig) -> Any:
    root = Path(os.path.expanduser(cfg.data_path))
    if not (root / "web_agent_site").is_dir():
        raise TaskError(f"env.data_path={cfg.data_path!r} is not a WebShop checkout "
                        "(expected a web_agent_site/ folder; see services/envs/README.md)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from web_agent_site.envs.web_agent_text_env import WebAgentTextEnv
    except ImportError as exc:
        raise TaskError(f"cannot import WebShop from {root}: {exc} (install its requirements)") from exc
    kwargs: dict[str, Any] = {"observation_mode": "text", "human_goals": True}
    if cfg.options.get("num_products"):
        kwargs["num_products"] = int(cfg.options["num_products"])
    return WebAgentTextEnv(**kwargs)
