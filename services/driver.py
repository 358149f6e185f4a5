"""The composition root: wires the plain classes into Ray actors and runs the training loop.

``proxmo train`` builds everything from one validated config tree:

    Redis (embedded or REDIS_URL) -> warm-started model -> policy endpoint (Ray Serve + vLLM)
    -> learner actor -> elastic pool of rollout actors

and runs the paper's loop as named stages per iteration: rollout (G episodes
per task, pushed to the buffer) -> learn (read, advantages, update) -> publish
(new weights on every replica) -> checkpoint + ack -> log. In ``sync`` mode
rollout and learning alternate; in ``async`` mode the next rollouts run while
the learner updates, at most ``max_policy_lag`` versions behind.

The command-line entry points (`proxmo train`, `eval`, `scale`) are in :mod:`services.driver_cli`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.config import TrainConfig
from services.rollout import Assignment, GroupSummary, RolloutWorker

log = logging.getLogger("proxmo")

CONTROL_ACTOR = "proxmo-control"
RUN_ID_FILE = "run_id"  # the run instance token (see TrainingRun._run_instance)
LEARNER_RESTARTS = 3  # learner deaths survived per run before the error is raised (issue 9)


class Control:
    """Named actor through which `proxmo scale` (another process) asks the driver to resize the pool."""

    def __init__(self) -> None:
        self.desired: int | None = None
        self.replicas: int | None = None
        self.status: dict[str, Any] = {}

    def request_workers(self, n: int) -> int:
        if n < 0:
            raise ValueError("number of workers must be >= 0")
        self.desired = int(n)
        return self.desired

    def take_request(self) -> int | None:
        n, self.desired = self.desired, None
        return n

    def request_replicas(self, n: int) -> int:
        if n < 1:
            raise ValueError("number of endpoint replicas must be >= 1")
        self.replicas = int(n)
        return self.replicas

    def take_replicas(self) -> int | None:
        n, self.replicas = self.replicas, None
        return n

    def set_status(self, status: dict[str, Any]) -> None:
        self.status = status

    def get_status(self) -> dict[str, Any]:
        return self.status


class _RolloutActor(RolloutWorker):
    """RolloutWorker with its buffer connection made inside the actor process."""

    def __init__(self, worker_id, env_cfg, rollout_cfg, sampling, model_path, policy, buffer_cfg, buffer_url,
                 max_model_len):
        from services.buffer import TrajectoryBuffer

        buffer = TrajectoryBuffer(buffer_cfg, buffer_url, consumer=worker_id) if buffer_url else None
        super().__init__(worker_id, env_cfg, rollout_cfg, sampling, model_path, policy, buffer, max_model_len)


def summarize(summaries: list[GroupSummary], prefix: str = "rollout") -> dict[str, float]:
    eps = sum(s.episodes for s in summaries) or 1
    steps = sum(s.steps for s in summaries) or 1
    out = {f"{prefix}/success_rate": sum(s.successes for s in summaries) / eps,
           f"{prefix}/episode_length": steps / eps,
           f"{prefix}/invalid_action_rate": sum(s.invalid_steps for s in summaries) / steps,
           f"{prefix}/inadmissible_action_rate": sum(s.inadmissible_steps for s in summaries) / steps,
           f"{prefix}/projected_action_rate": sum(s.projected_steps for s in summaries) / steps,
           f"{prefix}/infra_failures": float(sum(s.infra_failures for s in summaries)),
           f"{prefix}/groups": float(len(summaries))}
    by_type: dict[str, list[int]] = {}
    for s in summaries:
        acc = by_type.setdefault(s.task_type or "all", [0, 0])
        acc[0] += s.successes
        acc[1] += s.episodes
    out.update({f"success_rate/{t}": w / max(n, 1) for t, (w, n) in by_type.items()})
    return out


def eval_outcomes(episodes) -> list[int | None]:
    """Per evaluation episode, in task order: 1 won, 0 not won, None infrastructure failure."""
    return [None if e.infra_failure else int(bool(e.won)) for e in episodes]


def paired_difference(before: list[int | None], after: list[int | None]) -> dict[str, float]:
    """Mean and standard error of after - before over the episodes valid in both evaluations.

    The two evaluations play the same tasks with the same sampling seeds, so their outcomes
    are correlated and the paired standard error, std(d) / sqrt(n), is the honest (and
    usually smaller) noise of the improvement.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} vs {len(after)} outcomes")
    d = np.array([a - b for b, a in zip(before, after) if a is not None and b is not None], dtype=np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"pairs": float(n), "improvement": float(d.mean()) if n else float("nan"), "standard_error": se}


def eval_summary(episodes) -> dict[str, float]:
    valid = [e for e in episodes if not e.infra_failure]
    out = {"eval/success_rate": sum(e.won for e in valid) / max(len(valid), 1), "eval/episodes": float(len(valid)),
           "eval/infra_failures": float(len(episodes) - len(valid))}
    types = sorted({e.task_type for e in valid})
    for t in types:
        sub = [e for e in valid if e.task_type == t]
        out[f"eval/success_rate/{t or 'all'}"] = sum(e.won for e in sub) / len(sub)
    return out


class TrainingRun:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir) / cfg.run_name
        self.redis = None
        self.run_id: str | None = None  # the run instance token, set by start()
        self.policy = None
        self.deployment = None
        self._owns_deployment = False
        self._owns_ray = False
        self.learner = None
        self.pool = None
        self.control = None
        self.metrics = None
        self._task_env = None
        self.learner_done = 0  # iterations the live learner actor has completed (its checkpoint + since)
        self.learner_restarts = 0
        self._initial_version: int | None = None
        self.last_outcomes: list[int | None] = []  # of the latest evaluation, in task order

    # ------------------------------------------------------------------ start-up

    def start(self, deployment=None) -> None:
        """Bring every component up; ``deployment`` injects an already running policy app (tests)."""
        import ray

        from services.metrics import MetricsSink
        from services.sft import ensure_warm_model

        cfg = self.cfg
        self._keep_earlier_run()
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_id = self._run_instance()
        # Warm start first, on all cores, before any actor competes for them.
        model_path = ensure_warm_model(cfg.model, cfg.env, cfg.sft, cfg.seed)
        # Absolute: Ray workers and Serve replicas do not share the driver's working directory.
        self.model_cfg = replace(cfg.model, path=str(Path(model_path).resolve()))
        self.buffer_url = self._start_redis()
        self._init_ray()
        self.control = ray.remote(Control).options(name=f"{CONTROL_ACTOR}-{cfg.run_name}", num_cpus=0,
                                                   get_if_exists=True).remote()
        if deployment is None:
            self.policy = self._deploy_policy()
        else:
            self.policy = self._client_of(deployment)
        self.learner = self._start_learner()
        self.pool = self._start_pool()
        self.metrics = MetricsSink(self.out, cfg.run_name)
        from services.envs import make_env

        self._task_env = make_env(cfg.env)

    def _keep_earlier_run(self) -> None:
        """A fresh run (no ``resume``) never reuses an earlier run's folder: it is moved aside.

        The folder holds the embedded Redis's AOF, checkpoints and metrics; a fresh run starts
        clean and the earlier one stays readable. Nothing is deleted. What an external Redis keeps
        (idempotence table, unacked groups) is handled by the run instance token in the group ids.
        """
        if self.cfg.resume or not self.out.is_dir() or not any(self.out.iterdir()):
            return
        stem = f"{self.out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
        kept, n = self.out.with_name(stem), 1
        while kept.exists():
            kept, n = self.out.with_name(f"{stem}~{n}"), n + 1
        self.out.rename(kept)
        log.warning("%s held an earlier run; moved it to %s (pass --resume to continue a run instead)",
                    self.out, kept)

    def _run_instance(self) -> str:
        """This run's instance token, part of every group id: new for a fresh run, kept by ``--resume``.

        Group ids are the buffer's idempotence keys. On an external Redis (``REDIS_URL``) an earlier
        run with the same ``run_name`` leaves its ids in the idempotence table, and possibly unacked
        groups in the stream; with the token, this run's groups are never mistaken for those, and
        the learner dead-letters those instead of training on them. A run resumed from a folder
        written before the token existed keeps the old ids (token "").
        """
        f = self.out / RUN_ID_FILE
        if self.cfg.resume and f.is_file():
            return f.read_text().strip()
        if self.cfg.resume and (self.out / "run_state.json").is_file():
            return ""
        token = uuid.uuid4().hex[:8]
        f.write_text(token + "\n")
        return token

    @property
    def group_prefix(self) -> str:
        """What every group id of this run starts with."""
        if self.run_id is None:
            raise RuntimeError("TrainingRun.start() must run first: it sets the run instance token of the group ids")
        return f"{self.cfg.run_name}@{self.run_id}/" if self.run_id else f"{self.cfg.run_name}/"

    def _start_redis(self) -> str:
        url = self.cfg.buffer.url or os.environ.get("REDIS_URL", "")
        if url:
            return url
        from services.buffer import EmbeddedRedis

        data_dir = self.cfg.buffer.data_dir or str(self.out / "redis")
        self.redis = EmbeddedRedis(data_dir=data_dir)
        return self.redis.start()

    def _init_ray(self) -> None:
        import ray

        rc = self.cfg.ray
        if ray.is_initialized():
            return
        self._owns_ray = True
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if rc.address:
            ray.init(address=rc.address, namespace=rc.namespace, log_to_driver=True)
        else:
            # address="local": always a fresh local instance, never a cluster someone else started here.
            ray.init(address="local", num_cpus=rc.num_cpus or max(8, os.cpu_count() or 1), include_dashboard=rc.dashboard,
                     dashboard_host=rc.dashboard_host, namespace=rc.namespace, log_to_driver=False)

    def _deploy_policy(self, port: int | None = None):
        """Start the endpoint; actors get a copy of its client without the driver-side scaler."""
        from services.serving.app import deploy_policy

        self.deployment = deploy_policy(self.model_cfg, self.cfg.serving, port=port)
        self._owns_deployment = True
        return self._client_of(self.deployment)

    def _client_of(self, deployment):
        import copy

        self.deployment = deployment
        client = copy.copy(deployment.client)
        client.scaler = None
        return client

    def _start_learner(self):
        import ray

        from services.learner_worker import LearnerWorker

        c = self.cfg
        gpus = c.learner.num_gpus
        return ray.remote(LearnerWorker).options(
            num_cpus=c.learner.num_cpus, num_gpus=gpus, name=f"proxmo-learner-{c.run_name}", max_restarts=0,
        ).remote(self.model_cfg.path, c.learner, c.algorithm, c.loss, c.buffer, self.buffer_url, self.policy,
                 str(self.out / "checkpoints"), checkpoint_every=c.checkpoint_every, dtype=c.model.dtype,
                 temperature=c.sampling.temperature, group_prefix=self.group_prefix, torch_threads=(c.learner.torch_threads or max(1, int(round(c.learner.num_cpus)))) if gpus == 0 else 0)

    def _make_worker(self, wid: str):
        import ray

        c = self.cfg
        return ray.remote(_RolloutActor).options(
            num_cpus=c.rollout.num_cpus, resources=dict(c.rollout.resources), max_restarts=0,
        ).remote(wid, c.env, c.rollout, c.sampling, self.model_cfg.path, self.policy, c.buffer, self.buffer_url,
                 c.model.max_model_len)

    def _start_pool(self):
        from services.workers import WorkerPool

        r = self.cfg.rollout
        return WorkerPool(self._make_worker, r.num_workers, groups_per_chunk=max(r.envs_per_worker // r.group_size, 1),
                          min_size=r.min_workers, max_size=r.max_workers)

    # ------------------------------------------------------------------ stages

    def assignments(self, iteration: int) -> list[Assignment]:
        """Deterministic tasks of an iteration (same on resume); group ids are the idempotence keys."""
        c = self.cfg
        tasks = self._task_env.sample_tasks("train", c.learner.groups_per_batch, seed=c.seed * 1_000_003 + iteration)
        return [Assignment(t, group_id=f"{self.group_prefix}it{iteration}/g{j}") for j, t in enumerate(tasks)]

    def evaluate(self, n: int | None = None) -> dict[str, float]:
        """Evaluate on ``eval_split``; the same tasks (and seeds) every time. Outcomes: ``self.last_outcomes``."""
        c = self.cfg
        n = n or c.eval_episodes
        tasks = self._task_env.sample_tasks(c.eval_split, n, seed=c.seed + 7)
        seeds = ([int(x) for x in np.random.SeedSequence([abs(c.seed), 7]).generate_state(n)] if c.eval_seeded else None)
        episodes = self.pool.evaluate(tasks, greedy=c.eval_greedy, sample_seeds=seeds)
        self.last_outcomes = eval_outcomes(episodes)
        return eval_summary(episodes)

    def learn(self, iteration: int | None = None) -> dict[str, float]:
        """One learner iteration; with ``iteration``, survive the learner actor's death.

        A dead learner is replaced by a new actor under the same consumer name, resumed
        from ``checkpoints/latest``; it replays the iterations after that checkpoint from
        the records the buffer re-delivers (they were never acked), then runs
        ``iteration``. No rollout is dispatched again: the groups are still in the buffer.
        """
        m = self._with_learner(iteration, lambda: self.learner.train_iteration.remote(
            self.cfg.learner.groups_per_batch))
        m["learner/restarts"] = float(self.learner_restarts)
        return m

    def _with_learner(self, iteration: int | None, call, advance: bool = True) -> Any:
        import ray
        from ray.exceptions import RayActorError

        n = self.cfg.learner.groups_per_batch
        while True:
            try:
                if iteration is None:
                    return ray.get(call())
                while self.learner_done < iteration:  # replay after a restart
                    ray.get(self.learner.train_iteration.remote(n))
                    self.learner_done += 1
                if advance and self.learner_done > iteration:  # it died after checkpointing this one
                    return {"learner/restarts": float(self.learner_restarts)}
                out = ray.get(call())
                if advance:
                    self.learner_done = iteration + 1
                return out
            except RayActorError as exc:
                if self.learner_restarts >= LEARNER_RESTARTS:
                    raise
                self._restart_learner(exc)

    def _restart_learner(self, exc: BaseException) -> None:
        import ray

        self.learner_restarts += 1
        log.warning("learner died (%s); restart %d/%d from the last checkpoint", type(exc).__name__,
                    self.learner_restarts, LEARNER_RESTARTS)
        try:
            ray.kill(self.learner, no_restart=True)
        except Exception:  # already gone
            pass
        deadline = time.monotonic() + 60
        while True:  # the dead actor's name is released asynchronously
            try:
                self.learner = self._start_learner()
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        meta = ray.get(self.learner.resume.remote(self._initial_version))
        ray.get(self.learner.sync_endpoint.remote())
        self.learner_done = int(meta.get("iteration", 0))
        log.warning("learner restarted at iteration %d (step %s)", self.learner_done, meta.get("step"))

    def autoscale(self, m: dict[str, float]) -> None:
        """Requests from `proxmo scale` first; else, with rollout.autoscale, follow the learner's idle time."""
        import ray

        r = self.cfg.rollout
        replicas = ray.get(self.control.take_replicas.remote())
        if replicas is not None and self.deployment is not None:
            log.info("scaling policy endpoint to %d replica(s) (requested)", replicas)
            self.deployment.set_replicas(replicas, max(replicas, self.cfg.serving.max_replicas), wait=False)
        asked = ray.get(self.control.take_request.remote())
        if asked is not None:
            log.info("scaling rollout workers to %d (requested)", self.pool.scale(asked))
        elif r.autoscale:
            idle = m.get("time/learner_wait_s", 0.0) / max(m.get("time/learner_step_s", 1e-9), 1e-9)
            if idle > 0.5 and self.pool.size() < r.max_workers:  # learner starves: more rollout
                self.pool.scale(self.pool.size() + 1)
            elif idle < 0.05 and m.get("buffer/depth", 0) > self.cfg.learner.groups_per_batch and self.pool.size() > r.min_workers:
                self.pool.scale(self.pool.size() - 1)

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, float]:
        import ray

        c = self.cfg
        state_file = self.out / "run_state.json"
        state: dict[str, Any] = json.loads(state_file.read_text()) if c.resume and state_file.is_file() else {}
        start_it = 0
        if c.resume and (self.out / "checkpoints" / "latest").is_dir():
            meta = ray.get(self.learner.resume.remote())
            start_it = int(meta.get("iteration", 0))
            log.info("resumed from iteration %d (policy version %s)", start_it, meta.get("version"))
        synced = ray.get(self.learner.sync_endpoint.remote())
        self.learner_done = start_it
        if start_it == 0:
            self._initial_version = int(synced)  # a learner lost before its first checkpoint restarts here
        if "success_before" not in state:
            ev = self.evaluate()
            state.update(success_before=ev["eval/success_rate"], eval_episodes=int(ev["eval/episodes"]),
                         outcomes_before=self.last_outcomes)
            self.metrics.log(start_it, ev)
            state_file.write_text(json.dumps(state))
        lag = c.max_policy_lag if c.mode == "async" else 0
        rollouts: deque[tuple[int, cf.Future]] = deque()
        next_it = start_it
        end, t_rl = c.iterations, time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") as ex:
            bar = _progress(c.iterations, start_it, c.rl_seconds, t_rl)
            for it in range(start_it, c.iterations):
                # At least one iteration runs, however small the budget.
                if c.rl_seconds and it > start_it and end == c.iterations and time.perf_counter() - t_rl > c.rl_seconds:
                    end = next_it  # the time budget is spent: no new rollouts, learn from those in flight
                    log.warning("rl_seconds=%s spent after %d iterations; finishing the %d in flight, then stopping",
                                c.rl_seconds, it, end - it)
                if it >= end:
                    break
                t0 = time.perf_counter()
                while next_it < end and next_it <= it + lag:  # rollout stage (ahead by lag)
                    rollouts.append((next_it, ex.submit(self.pool.run, self.assignments(next_it))))
                    next_it += 1
                ro_it, fut = rollouts.popleft()
                summaries = fut.result()
                t1 = time.perf_counter()
                m = self.learn(it)  # learn + publish + checkpoint/ack stages, in the learner actor
                m.update(summarize(summaries))
                m.update({"time/rollout_wait_s": t1 - t0, "time/iteration_s": time.perf_counter() - t0,
                          "rollout/workers": float(self.pool.size()), "rollout/replaced": float(self.pool.replaced)})
                if c.eval_every and (it + 1) % c.eval_every == 0 and it + 1 < c.iterations:
                    m.update(self.evaluate())
                self.metrics.log(it + 1, m)
                self.control.set_status.remote({"iteration": it + 1, "workers": self.pool.size()})
                self.autoscale(m)
                _advance(bar, m, it + 1)
            _close(bar)
        self._with_learner(end, lambda: self.learner.finish.remote(), advance=False)
        ev = self.evaluate()
        self.metrics.log(end, ev)
        state.update(success_after=ev["eval/success_rate"], iterations=end, outcomes_after=self.last_outcomes)
        before = state.get("outcomes_before")
        if c.eval_seeded and before is not None and len(before) == len(self.last_outcomes):
            state["paired"] = paired_difference(before, self.last_outcomes)
            self.metrics.log(end, {f"eval/paired_{k}": v for k, v in state["paired"].items()})
        state_file.write_text(json.dumps(state))
        return {"success_before": state["success_before"], "success_after": state["success_after"],
                "eval_episodes": int(ev["eval/episodes"]), "iterations": end, "paired": state.get("paired")}

    def close(self) -> None:
        png = self.metrics.close() if self.metrics else None
        if png:
            log.info("learning curve: %s", png)
        if self._task_env is not None:
            self._task_env.close()
        if self.pool is not None:
            self.pool.shutdown()
        if self.learner is not None:
            try:
                import ray

                ray.kill(self.learner, no_restart=True)
                ray.kill(self.control, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            import ray
            from ray import serve

            if self.deployment is not None and self._owns_deployment:
                self.deployment.shutdown()
            if ray.is_initialized() and self._owns_ray:
                serve.shutdown()
                ray.shutdown()
        except Exception as exc:  # shutting down; report, don't mask the real error
            log.warning("ray shutdown: %s", exc)
        if self.redis is not None:
            self.redis.stop()


def _progress(total: int, start: int, seconds: float = 0.0, t0: float = 0.0):
    """The terminal's progress bar: over iterations, or over the time budget when ``rl_seconds`` ends the stage."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if seconds:  # `iterations` is then only an upper bound, and a bar to it would end far short
        bar = tqdm(total=round(seconds), desc="train", unit="s", dynamic_ncols=True, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total} s [{elapsed}{postfix}]")
        bar.budget_start = t0
        return bar
    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr)


def _advance(bar, m: dict[str, float], iteration: int) -> None:
    if bar is None:
        return
    bar.set_postfix(it=iteration, success=f"{m.get('rollout/success_rate', 0):.2f}", v=int(m.get("policy_version", 0)),
                    refresh=False)
    start = getattr(bar, "budget_start", None)
    if start is None:
        bar.update(1)
    else:
        bar.update(min(float(bar.total), time.perf_counter() - start) - bar.n)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
