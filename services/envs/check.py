"""``proxmo envs check``: every installed environment, played by its own expert.

For each environment whose package is importable, the expert plays a few
tasks; one line per (environment, game) reports expert success and steps/s
(environment steps only; resets and game generation are reported separately).
A check passes when the expert wins every task. The last line is
``N passed, M failed``; the exit code is 0 only when nothing failed.

    proxmo envs check [--envs textworldexpress,alfworld] [--episodes 3] [--quick]

``--quick`` runs one game per environment (what the default test suite uses).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass, replace

from services.config import EnvConfig
from services.envs.base import TextEnv, make_env
from services.envs.experts import run_expert

# (env name, package that must be importable, games to check, extra EnvConfig fields)
_PLAN: list[tuple[str, str, list[str], dict]] = [
    ("textworldexpress", "textworld_express",
     ["twc", "cookingworld", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder"], {}),
    ("textworld", "textworld", ["simple", "coin_collector", "treasure_hunter", "cooking"], {}),
    ("alfworld", "alfworld", ["pick", "look", "clean", "heat", "cool", "pick2"],
     {"options": {"source": "generated"}}),
    ("webshop", "", ["catalog"], {}),
    ("scienceworld", "scienceworld", ["find-living-thing"], {}),
]
_TWX_PARAMS = {"twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0"}


@dataclass
class CheckResult:
    env: str
    game: str
    episodes: int
    won: int
    steps: int
    step_seconds: float
    reset_seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.episodes > 0 and self.won == self.episodes

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.step_seconds if self.step_seconds > 0 else 0.0

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        rate = 100.0 * self.won / self.episodes if self.episodes else 0.0
        tail = f"  error: {self.error}" if self.error else ""
        return (f"{status}  {self.env:<16} {self.game:<18} expert {self.won}/{self.episodes} ({rate:5.1f}%)  "
                f"{self.steps_per_s:8.1f} steps/s  reset {self.reset_seconds / max(1, self.episodes):5.2f} s{tail}")


class _Timed:
    """Forwards to an env and accumulates time spent in reset / step."""

    def __init__(self, env: TextEnv) -> None:
        self.inner, self.reset_s, self.step_s, self.n_steps = env, 0.0, 0.0, 0
        self.name, self.family, self.cfg = env.name, env.family, env.cfg

    def sample_tasks(self, split, n, seed):
        return self.inner.sample_tasks(split, n, seed)

    def reset(self, task):
        t = time.perf_counter()
        try:
            return self.inner.reset(task)
        finally:
            self.reset_s += time.perf_counter() - t

    def step(self, action):
        t = time.perf_counter()
        try:
            return self.inner.step(action)
        finally:
            self.step_s += time.perf_counter() - t
            self.n_steps += 1

    def expert_actions(self):
        return self.inner.expert_actions()

    def close(self) -> None:
        self.inner.close()


def env_config(env: str, game: str, max_steps: int = 200, **extra) -> EnvConfig:
    cfg = EnvConfig(name=env, game=game, max_steps=max_steps, **extra)
    if env == "textworldexpress":
        cfg = replace(cfg, game_params=_TWX_PARAMS.get(game, ""))
    return cfg


def check_one(env_name: str, game: str, episodes: int, seed: int = 0, split: str = "train",
              extra: dict | None = None) -> CheckResult:
    cfg = env_config(env_name, game, **(extra or {}))
    try:
        env = _Timed(make_env(cfg))
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        return CheckResult(env_name, game, 0, 0, 0, 0.0, 0.0, f"{type(exc).__name__}: {exc}")
    won = 0
    done = 0
    try:
        for task in env.sample_tasks(split, episodes, seed):
            _, ok, _ = run_expert(env, task, cfg)
            won += int(ok)
            done += 1
        return CheckResult(env_name, game, done, won, env.n_steps, env.step_s, env.reset_s)
    except Exception as exc:  # noqa: BLE001
        return CheckResult(env_name, game, done, won, env.n_steps, env.step_s, env.reset_s,
                           f"{type(exc).__name__}: {exc}")
    finally:
        env.close()


def installed(package: str) -> bool:
    return not package or importlib.util.find_spec(package) is not None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="proxmo envs check", description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="", help="comma list (default: every installed environment)")
    p.add_argument("--episodes", type=int, default=3, help="tasks per game")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one game per environment")
    args = p.parse_args(argv)
    wanted = {e for e in args.envs.split(",") if e}
    results: list[CheckResult] = []
    for env_name, package, games, extra in _PLAN:
        if wanted and env_name not in wanted:
            continue
        if not installed(package):
            print(f"SKIP  {env_name:<16} (package {package!r} is not installed)")
            continue
        episodes = 1 if env_name == "scienceworld" and not wanted else args.episodes
        for game in games[:1] if args.quick else games:
            r = check_one(env_name, game, episodes, args.seed, extra=extra)
            print(r.line(), flush=True)
            results.append(r)
    passed = sum(r.passed for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if results and passed == len(results) else 1
