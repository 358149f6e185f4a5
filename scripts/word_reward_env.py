"""A pipeline check, not a benchmark: the real twc game, where only the first turn counts.

An episode is one turn; it is won when the action's first word is ``env.options["word"]``
("take" by default). A policy learns this by raising one global preference, which RL on the
warm start does within a few updates offline (BENCHMARKS.md, session 6). Run through the whole
pipeline (rollout worker, buffer, learner, weight broadcast) it checks that the data path climbs
a reward that is easy to climb:

    PYTHONPATH=. .venv/bin/proxmo train --config deploy/configs/quickstart.yaml run_name=word \
        env.name=scripts.word_reward_env:FirstWordTWX env.max_steps=1 model.tiny=false rl_seconds=120 eval_episodes=128
"""

from __future__ import annotations

from typing import Any

from services.envs.twx import TextWorldExpressEnv


class FirstWordTWX(TextWorldExpressEnv):
    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        obs, info = super()._step(action)
        hit = action.split()[:1] == [str((self.cfg.options or {}).get("word", "take"))]
        info.update(won=hit, lost=not hit)  # one turn either way
        return obs, info
