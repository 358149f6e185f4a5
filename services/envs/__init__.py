"""Multi-turn text environments behind one interface (see ``README.md`` in this folder).

Adapters are registered as lazy "module:attr" strings so importing this package
never starts a JVM or imports a heavy third-party package.
"""

from services.envs.base import (
    WIN_REWARD,
    EnvInfraError,
    StepResult,
    Task,
    TaskError,
    TextEnv,
    list_envs,
    make_env,
    register_env,
)
from services.envs.guarded import GuardedEnv

register_env("textworldexpress", "services.envs.twx:TextWorldExpressEnv")
register_env("textworld", "services.envs.textworld_env:TextWorldEnv")
register_env("scienceworld", "services.envs.scienceworld_env:ScienceWorldEnv")
register_env("alfworld", "services.envs.alfworld_env:AlfWorldEnv")
register_env("webshop", "services.envs.webshop:WebShopEnv")

__all__ = [
    "WIN_REWARD",
    "EnvInfraError",
    "GuardedEnv",
    "StepResult",
    "Task",
    "TaskError",
    "TextEnv",
    "list_envs",
    "make_env",
    "register_env",
]
