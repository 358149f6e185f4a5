"""Synthetic ALFWorld-shaped batches for tests and benchmarks.

A group is G episodes of one household task (same room, same seed). Each step the agent
goes to a receptacle and sees its contents, so observations repeat heavily inside a group
(a few dozen distinct states) and partly across groups (shared templates), as in
ALFWorld. A successful episode ends early with reward 10 on its last step; a failed one
runs to ``max_steps`` with reward 0. About one action in ten is invalid
("Nothing happens."). Group difficulty varies, so some groups are all-fail, some
all-success and most mixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from proxmo.batch import AdvantageInputs

_RECEPTACLES = ["cabinet", "drawer", "countertop", "shelf", "fridge", "microwave", "sinkbasin",
                "stoveburner", "diningtable", "sidetable", "garbagecan", "coffeemachine", "toaster", "desk"]
_OBJECTS = ["mug", "kettle", "apple", "bread", "knife", "fork", "spoon", "plate", "bowl", "cup", "egg",
            "lettuce", "potato", "tomato", "pan", "pot", "saltshaker", "peppershaker", "soapbottle", "sponge"]


@dataclass
class SyntheticBatch:
    """Column lists, one entry per (trajectory, step) row."""

    group: list[str]
    traj: list[str]
    step: list[int]
    reward: list[float]
    valid: list[int]
    anchor: list[str]
    episode_reward: list[float]
    success: list[bool]

    def __len__(self) -> int:
        return len(self.reward)

    def to_inputs(self, with_success: bool = False) -> AdvantageInputs:
        return AdvantageInputs(group=self.group, traj=self.traj, step=self.step, reward=self.reward,
                               valid=self.valid, anchor=self.anchor, episode_reward=self.episode_reward,
                               success=self.success if with_success else None)

    def rows(self) -> list[dict[str, Any]]:
        """Rows in the reference file's layout (``obs`` holds the anchor)."""
        return [{"group": g, "traj": t, "step": s, "obs": o, "valid": v, "reward": r, "episode_reward": e}
                for g, t, s, o, v, r, e in zip(self.group, self.traj, self.step, self.anchor, self.valid,
                                               self.reward, self.episode_reward, strict=True)]


def _room(rng: random.Random) -> tuple[str, list[str], dict[str, str]]:
    places = [f"{name} {i}" for name in rng.sample(_RECEPTACLES, rng.randint(4, 7)) for i in range(1, rng.randint(2, 4))]
    contents = {}
    for place in places:
        k = rng.randint(0, 3)
        items = [f"a {rng.choice(_OBJECTS)} {rng.randint(1, 3)}" for _ in range(k)]
        contents[place] = (f"On the {place}, you see {', '.join(items)}." if items
                           else f"On the {place}, you see nothing.")
    start = ("You are in the middle of a room. Looking quickly around you, you see "
             + ", ".join(f"a {p}" for p in places) + ".")
    return start, places, contents


def make_batch(n_groups: int = 16, group_size: int = 8, max_steps: int = 50, seed: int = 0,
               invalid_rate: float = 0.1, prefix: str = "g", distinct: bool = False) -> SyntheticBatch:
    """A batch of ``n_groups`` x ``group_size`` episodes of at most ``max_steps`` steps.

    distinct: tag every observation with its trajectory and step, so no two rows share a
    state (worst case for the state de-duplication in proxmo.proximity).
    """
    rng = random.Random(seed)
    cols: dict[str, list[Any]] = {k: [] for k in SyntheticBatch.__dataclass_fields__}
    for g in range(n_groups):
        start, places, contents = _room(rng)
        difficulty = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0])  # chance that an episode succeeds
        gid = f"{prefix}{seed}_{g}"
        for e in range(group_size):
            won = rng.random() < difficulty
            length = rng.randint(max(1, max_steps // 5), max(1, max_steps * 3 // 4)) if won else max_steps
            tid = f"{gid}_t{e}"
            obs = start
            for t in range(length):
                valid = int(rng.random() >= invalid_rate)
                last = t == length - 1
                cols["group"].append(gid)
                cols["traj"].append(tid)
                cols["step"].append(t)
                cols["anchor"].append(f"{obs} [{tid} step{t}]" if distinct else obs)
                cols["valid"].append(valid)
                cols["reward"].append(10.0 if (won and last) else 0.0)
                cols["episode_reward"].append(10.0 if won else 0.0)
                cols["success"].append(won)
                if not valid:
                    obs = "Nothing happens."
                elif rng.random() < 0.3:  # interact with the object at hand (pick up, open, heat, ...)
                    verb = rng.choice(["pick up", "put", "open", "close", "heat", "cool", "clean", "examine"])
                    obs = f"You {verb} the {rng.choice(_OBJECTS)} {rng.randint(1, 3)} at the {rng.choice(places)}."
                else:
                    place = rng.choice(places)
                    obs = f"You arrive at {place}. {contents[place]}"
    return SyntheticBatch(**cols)
