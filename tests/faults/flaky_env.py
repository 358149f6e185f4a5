"""A real TextWorldExpress environment with injected breakage, for fault tests.

Named by ``"tests.faults.flaky_env:FlakyTWX"`` in ``env.name``, so it goes through
the same lazy ``module:attr`` registry path as any user environment. It is the
real game; only the instances listed in ``env.options`` break, each once:

- ``raise_instances``: instance numbers (per process, in creation order) whose
  step number ``fail_at_step`` raises ``RuntimeError`` (0: the reset raises);
- ``hang_instances``: same, but the step blocks (until ``close()`` or
  ``hang_s``) as a wedged JVM call would.

A broken instance is replaced by :class:`~services.envs.guarded.GuardedEnv` with
a new instance, which gets a new number and therefore works.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from services.config import EnvConfig
from services.envs.twx import TextWorldExpressEnv

_NUMBERS = itertools.count()
CREATED: list[int] = []  # instance numbers created in this process (tests inspect it in-process)


class FlakyTWX(TextWorldExpressEnv):
    def __init__(self, cfg: EnvConfig, simulator: Any = None) -> None:
        super().__init__(cfg, simulator)
        self.number = next(_NUMBERS)
        CREATED.append(self.number)
        opts = cfg.options or {}
        self._raise = self.number in set(opts.get("raise_instances", []))
        self._hang = self.number in set(opts.get("hang_instances", []))
        self._fail_at = int(opts.get("fail_at_step", 1))
        self._hang_s = float(opts.get("hang_s", 600.0))
        self._released = threading.Event()

    def _reset(self, task):
        if self._fail_at == 0 and self._raise:
            raise RuntimeError(f"injected failure in instance {self.number} at reset")
        return super()._reset(task)

    def _step(self, action: str) -> tuple[str, dict[str, Any]]:
        if self.steps + 1 == self._fail_at:
            if self._raise:
                raise RuntimeError(f"injected failure in instance {self.number} at step {self._fail_at}")
            if self._hang:
                self._released.wait(self._hang_s)
                raise RuntimeError(f"injected hang in instance {self.number} released")
        return super()._step(action)

    def close(self) -> None:
        self._released.set()
        super().close()
