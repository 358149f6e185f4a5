"""Turn environment breakage into an infrastructure outcome, and heal on the next reset.

A JVM that dies, a py4j socket that hangs, or an adapter bug must not look like
"the agent failed the task" to the learner (that would be a wrong 0 reward) and
must not kill the rollout worker. Any exception or a missed deadline raises
:class:`EnvInfraError`; the broken instance is closed and a fresh one is built
by the factory on the next ``reset``. The rollout worker drops or retries that
group.

Two ways to enforce the deadline:

* ``isolate=True`` (default): every call runs in a helper thread and the caller
  waits with a timeout, so control returns even from a hang that closing the
  env cannot interrupt (pure-Python or C code, e.g. the PDDL planner). The
  watchdog below runs as well: a caller held up by the hung simulator itself
  (a py4j finalizer run by the garbage collector blocks on a frozen JVM's
  socket) is freed when the watchdog kills the JVM at the deadline.
* ``isolate=False``: the call runs in the caller's thread and one watchdog
  thread per env kills the environment when the deadline passes. Killing the
  JVM (TextWorldExpress, ScienceWorld) makes the stuck call raise, so control
  returns within ``step_timeout_s`` + one watchdog period, but a hang that
  killing cannot interrupt blocks the caller.

Cost (``proxmo bench envs``, TextWorldExpress twc, 2 cores at load average
~20): guarded/raw steps/s ranged 0.40-1.27 (isolate) and 0.52-1.36 (watchdog)
over six runs, with no consistent difference between the two modes; an env
step that is not sub-millisecond hides it entirely.

:class:`TaskError` (bad input from the caller) passes through unchanged: it is
a bug in the caller, not in the environment.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from services.envs.base import EnvInfraError, StepResult, Task, TaskError, TextEnv

log = logging.getLogger(__name__)


class GuardedEnv:
    """Same interface as :class:`TextEnv`; failures raise :class:`EnvInfraError`."""

    def __init__(self, factory: Callable[[], TextEnv], step_timeout_s: float = 30.0,
                 reset_timeout_s: float | None = None, isolate: bool = True) -> None:
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self._factory = factory
        self.step_timeout_s = float(step_timeout_s)
        # Resets may start a JVM or load a game: allow more time than a step.
        self.reset_timeout_s = float(reset_timeout_s or max(60.0, 4 * step_timeout_s))
        self._env: TextEnv | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._broken = False
        self.isolate = isolate
        self.infra_failures = 0
        self.restarts = 0
        self._watch: tuple[float, object] | None = None  # (deadline, call token)
        self._fired: object | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._period = max(0.05, min(1.0, self.step_timeout_s / 10))

    # ------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[..., Any], timeout: float, what: str, *args: Any) -> Any:
        # Both modes arm the watchdog: it kills the environment when the deadline passes. In the
        # isolated mode the caller also stops waiting at the deadline, but it can itself be held up
        # by the hung simulator, e.g. by a py4j finalizer that the garbage collector runs in the
        # caller's thread and that blocks on the frozen JVM's socket; only killing the JVM frees it.
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch_loop, name="guarded-env-watchdog", daemon=True)
            self._watchdog.start()
        token = object()
        self._watch = (time.monotonic() + timeout, token)
        try:
            try:
                result = self._run_isolated(fn, timeout, *args) if self.isolate else fn(*args)
            except TaskError:
                raise
            except cf.TimeoutError:  # the isolated caller stopped waiting at the deadline
                self._fail(f"{what} timed out after {timeout:.1f}s", None)
            except Exception as exc:  # noqa: BLE001 - every env failure is an infra outcome
                if self._fired is token:  # the watchdog killed the env: that is why the call failed
                    self._fail(f"{what} timed out after {timeout:.1f}s", exc)
                self._fail(f"{what} raised {type(exc).__name__}: {exc}", exc)
            if self._fired is token:  # it returned, but only after the watchdog closed the env
                self._fail(f"{what} timed out after {timeout:.1f}s", None)
            return result
        finally:
            self._watch = None

    def _watch_loop(self) -> None:
        while not self._stop.wait(self._period):
            w = self._watch
            if w is not None and time.monotonic() > w[0] and self._fired is not w[1]:
                self._fired = w[1]
                env = self._env
                if env is not None:
                    _quiet_close(env)  # kills the JVM: the stuck call raises in the caller's thread

    def _run_isolated(self, fn: Callable[..., Any], timeout: float, *args: Any) -> Any:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guarded-env")
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def _fail(self, msg: str, exc: BaseException | None) -> None:
        self.infra_failures += 1
        self._broken = True
        env, pool = self._env, self._pool
        self._env, self._pool = None, None
        log.warning("environment failure (%s); it will be recreated on the next reset", msg)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if env is not None:
            # close() kills the JVM, which also unblocks a call stuck on its socket.
            threading.Thread(target=_quiet_close, args=(env,), daemon=True).start()
        raise EnvInfraError(msg) from exc

    def _ensure(self) -> TextEnv:
        if self._env is None:
            if self._broken:
                self.restarts += 1
            self._env = self._call(self._factory, self.reset_timeout_s, "creating the environment")
            self._broken = False
        return self._env

    # ------------------------------------------------------------ TextEnv API

    @property
    def env(self) -> TextEnv | None:
        return self._env

    @property
    def name(self) -> str:
        return self._ensure().name

    @property
    def family(self) -> str:
        return self._ensure().family

    def sample_tasks(self, split: str, n: int, seed: int) -> list[Task]:
        env = self._ensure()
        return self._call(env.sample_tasks, self.reset_timeout_s, "sample_tasks", split, n, seed)

    def reset(self, task: Task) -> tuple[str, dict[str, Any]]:
        env = self._ensure()
        return self._call(env.reset, self.reset_timeout_s, "reset", task)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise EnvInfraError("the environment was lost in an earlier failure; call reset() first")
        return self._call(self._env.step, self.step_timeout_s, "step", action)

    def expert_actions(self) -> list[str] | None:
        if self._env is None:
            raise EnvInfraError("no live environment; call reset() first")
        return self._call(self._env.expert_actions, self.reset_timeout_s, "expert_actions")

    def close(self) -> None:
        self._stop.set()
        env, pool = self._env, self._pool
        self._env, self._pool = None, None
        if env is not None:
            try:
                env.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing the environment failed: %s", exc)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GuardedEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_close(env: TextEnv) -> None:
    try:
        env.kill() if hasattr(env, "kill") else env.close()
    except Exception as exc:  # noqa: BLE001 - already failing; closing is best effort
        log.debug("closing a broken environment failed: %s", exc)
