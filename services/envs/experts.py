"""Expert demonstrations in the agent protocol, for the supervised warm start.

Each environment's expert (TextWorldExpress / ScienceWorld gold paths, TextWorld
walkthroughs, the ALFWorld planner, the WebShop catalogue's goal product) is
replayed in the real environment; every step becomes one example whose
``messages`` are exactly what the policy will see at that step during RL
(:func:`~services.envs.protocol.build_messages`) and whose ``response`` is
``format_response(action)``. Only episodes the expert actually wins are kept, so
a broken expert can never teach a wrong action; the count of dropped episodes is
logged and returned by :func:`expert_episodes`.

``proxmo envs demos --out FILE.jsonl [--episodes N] [--seed S] [--split train] [--noise P]
[key=value ...]`` writes them as JSON lines; ``--noise`` (``sft.demo_noise`` for `proxmo sft`)
makes an imperfect demonstrator, see :func:`run_expert`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.config import EnvConfig, apply_overrides, from_dict, to_dict
from services.envs.base import TextEnv, make_env
from services.envs.protocol import answer_for, build_messages, format_response

log = logging.getLogger(__name__)


def run_expert(env: TextEnv, task, cfg: EnvConfig, noise: float = 0.0,
               rng: random.Random | None = None) -> tuple[list[dict], bool, int]:
    """Play ``task`` with the env's expert; returns (examples, won, steps).

    ``noise`` > 0 makes an imperfect demonstrator: each step's *label* is, with that probability, a
    uniformly drawn other admissible action, while the env still executes the expert's action (so
    every kept episode is won and the states are the expert's).
    """
    rng = rng or random.Random(0)
    obs, info = env.reset(task)
    plan = env.expert_actions()
    if not plan:
        return [], False, 0
    history: list[tuple[str, str]] = []
    examples: list[dict] = []
    desc = info.get("task_description", "")
    admissible = info["admissible_actions"]
    won = False
    for step, raw in enumerate(plan):
        action = " ".join(raw.split()).lower()
        messages = build_messages(desc, history, obs, admissible, step, cfg)
        label = action
        if noise > 0 and rng.random() < noise:
            label = rng.choice([a for a in admissible if a != action] or [action])
        examples.append({"messages": messages, "response": format_response(answer_for(label, admissible, cfg)),
                         "task_type": task.task_type, "task_id": task.task_id, "step": step})
        res = env.step(action)
        history.append((obs, action))
        obs, admissible = res.observation, res.info["admissible_actions"]
        won = bool(res.info.get("won"))
        if res.done:
            break
    return examples, won, len(history)


def expert_episodes(cfg: EnvConfig, n_episodes: int, seed: int, split: str = "train",
                    env: TextEnv | None = None, noise: float = 0.0) -> tuple[list[dict], dict[str, Any]]:
    """Examples from the won episodes of ``n_episodes`` sampled tasks, plus counts.

    ``noise``: label noise of an imperfect demonstrator (see :func:`run_expert`); seeded by ``seed``.

    A caller-supplied ``env`` keeps its own step cap; make it at least the expert's plan length.
    """
    # The expert's plan may be longer than the RL step cap; demonstrations need the whole plan.
    cfg = replace(cfg, max_steps=max(cfg.max_steps, int(cfg.options.get("expert_max_steps", 200))))
    own = env is None
    env = env or make_env(cfg)
    out: list[dict] = []
    stats = {"episodes": 0, "won": 0, "dropped": 0}
    rng = random.Random(seed)
    try:
        for task in env.sample_tasks(split, n_episodes, seed):
            examples, won, _ = run_expert(env, task, cfg, noise, rng)
            stats["episodes"] += 1
            if won:
                stats["won"] += 1
                out.extend(examples)
            else:
                stats["dropped"] += 1
                log.warning("expert did not win %s; its episode is not used", task.task_id)
    finally:
        if own:
            env.close()
    return out, stats


def expert_examples(cfg: EnvConfig, n_episodes: int, seed: int, split: str = "train",
                    noise: float = 0.0) -> list[dict]:
    """``[{"messages", "response", "task_type", ...}]`` for SFT, from won expert episodes."""
    return expert_episodes(cfg, n_episodes, seed, split, noise=noise)[0]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="proxmo envs demos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--noise", type=float, default=0.0,
                   help="label noise of an imperfect demonstrator, as sft.demo_noise (0: the expert's own actions)")
    p.add_argument("overrides", nargs="*", help="env fields, e.g. name=textworld game=coin_collector")
    args = p.parse_args(argv)
    try:
        data = apply_overrides(to_dict(EnvConfig()), args.overrides)
        cfg = from_dict(EnvConfig, data, "env")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0.0 <= args.noise < 1.0:
        print(f"error: --noise must be in [0, 1), got {args.noise}", file=sys.stderr)
        return 2
    examples, stats = expert_episodes(cfg, args.episodes, args.seed, args.split, noise=args.noise)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    print(f"wrote {len(examples)} examples from {stats['won']}/{stats['episodes']} won episodes to {path}")
    return 0 if stats["won"] == stats["episodes"] else 1
