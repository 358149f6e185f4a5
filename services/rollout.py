"""Rollout worker: runs groups of G episodes on text environments against the policy endpoint.

A plain class; the driver wraps it with ``ray.remote`` and injects the policy
client and the trajectory buffer. Episodes of all groups it is running step in
lockstep so that each turn is one batched request to the endpoint.

Rules that keep the data exact (issue 6, issue 9):
- a group is pushed to the buffer only when all G episodes are finished, as one
  record, under the ``group_id`` of its assignment. A worker that dies
  mid-episode pushes nothing; the driver re-runs the assignment under the same
  ``group_id``, and the buffer's idempotent push never counts a group twice;
- an invalid model output spends the turn without stepping the environment
  (the observation stays, the step is penalised by the estimator);
- an environment that raises or hangs marks its episode ``infra_failure`` (the
  learner masks it out of group statistics instead of scoring it 0) and the
  environment is recreated before its next episode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from services.config import EnvConfig, RolloutConfig, SamplingConfig
from services.contracts import EpisodeRecord, EpisodeSteps, columnar_group
from services.envs import EnvInfraError, GuardedEnv, Task, make_env
from services.envs.protocol import build_messages, parse_action

log = logging.getLogger(__name__)

POLICY_RETRY_S = 600.0  # a policy call is retried this long: covers a replica restart (vLLM start-up)


@dataclass(frozen=True)
class Assignment:
    """One task to run as a group; ``group_id`` is fixed by the driver (idempotence key).

    ``sample_seed`` (evaluation): every model call of the episode samples with a seed derived
    from it, the episode index and the turn, so two evaluations of the same tasks share their
    random numbers and differ only where the policies differ (common random numbers).
    """

    task: Task
    group_id: str
    attempt: int = 0
    sample_seed: int | None = None


def call_seed(sample_seed: int, episode: int, turn: int) -> int:
    """The sampling seed of one model call of a seeded episode (31 bits, stable across runs)."""
    return int(np.random.SeedSequence([sample_seed, episode, turn]).generate_state(1)[0] >> 1)


@dataclass
class _Episode:
    env: GuardedEnv
    assignment: Assignment
    index: int
    observation: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)
    steps: EpisodeSteps = field(default_factory=EpisodeSteps)  # recorded as columns (issue 3)
    won: bool = False
    score: float = 0.0
    done: bool = False
    infra_failure: bool = False
    failure_reason: str = ""
    inadmissible: int = 0  # well-formed actions the env did not list as admissible
    projected: int = 0  # of those, replaced by the nearest admissible action (env.action_projection)


@dataclass
class GroupSummary:
    group_id: str
    task_id: str
    task_type: str
    episodes: int
    steps: int
    successes: int
    invalid_steps: int
    infra_failures: int
    policy_version: int
    pushed: bool
    inadmissible_steps: int = 0  # well-formed but not admissible; among invalid_steps with env.inadmissible_is_invalid
    projected_steps: int = 0  # inadmissible actions the env replaced by the nearest admissible one


def _load_tokenizer(auto_cls, model_path: str):
    """The tokenizer of ``model_path``; a missing folder or tokenizer names the path (issue 9)."""
    from pathlib import Path

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model path {model_path!r} does not exist or is not a folder "
                                "(set model.path to a Hugging Face model folder)")
    try:
        return auto_cls.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no usable tokenizer in model path {model_path!r} "
                                f"(tokenizer.json / tokenizer_config.json): {str(exc)[:200]}") from exc


class RolloutWorker:
    def __init__(self, worker_id: str, env_cfg: EnvConfig, rollout_cfg: RolloutConfig, sampling: SamplingConfig,
                 model_path: str, policy, buffer=None, max_model_len: int = 512):
        from transformers import AutoTokenizer

        self.worker_id = worker_id
        self.env_cfg, self.cfg, self.sampling = env_cfg, rollout_cfg, sampling
        self.policy, self.buffer = policy, buffer
        self.max_model_len = max_model_len
        self.tokenizer = _load_tokenizer(AutoTokenizer, model_path)
        self._envs: list[GuardedEnv] = []
        self._last_version = 0  # newest policy version seen in a response
        self.stats = {"env_steps": 0, "groups": 0, "episodes": 0, "infra_failures": 0, "env_seconds": 0.0,
                      "policy_seconds": 0.0, "busy_seconds": 0.0}

    def _env(self, i: int) -> GuardedEnv:
        while len(self._envs) <= i:
            self._envs.append(GuardedEnv(lambda: make_env(self.env_cfg), self.env_cfg.step_timeout_s))
        return self._envs[i]

    # ------------------------------------------------------------------ public

    def run(self, assignments: list[Assignment], *, greedy: bool = False, push: bool = True) -> list[GroupSummary]:
        """Run every assignment as a group of ``group_size`` episodes; push each finished group."""
        t0 = time.perf_counter()
        g = self.cfg.group_size
        slots = max(self.cfg.envs_per_worker // g, 1)  # groups that run side by side
        out: list[GroupSummary] = []
        for start in range(0, len(assignments), slots):
            wave = assignments[start : start + slots]
            episodes = [_Episode(self._env(wi * g + k), a, k) for wi, a in enumerate(wave) for k in range(g)]
            self._play(episodes, greedy)
            for wi, a in enumerate(wave):
                out.append(self._finish(a, episodes[wi * g : (wi + 1) * g], push))
        self.stats["busy_seconds"] += time.perf_counter() - t0
        return out

    def episodes(self, tasks: list[Task], *, greedy: bool = True,
                 sample_seeds: list[int] | None = None) -> list[EpisodeRecord]:
        """Evaluation: one episode per task, nothing pushed; ``sample_seeds``: one per task (see Assignment)."""
        if sample_seeds is not None and len(sample_seeds) != len(tasks):
            raise ValueError(f"{len(sample_seeds)} sample_seeds for {len(tasks)} tasks")
        n = max(self.cfg.envs_per_worker, 1)
        records: list[EpisodeRecord] = []
        for start in range(0, len(tasks), n):
            chunk = tasks[start : start + n]
            seeds = sample_seeds[start : start + n] if sample_seeds is not None else [None] * len(chunk)
            eps = [_Episode(self._env(i), Assignment(t, group_id=f"eval-{t.task_id}", sample_seed=sd), 0)
                   for i, (t, sd) in enumerate(zip(chunk, seeds))]
            self._play(eps, greedy)
            records.extend(self._record(e) for e in eps)
        return records

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)

    def close(self) -> None:
        for env in self._envs:
            env.close()

    # ------------------------------------------------------------------ stages

    def _play(self, episodes: list[_Episode], greedy: bool) -> None:
        for ep in episodes:
            self._reset(ep)
        while True:
            active = [e for e in episodes if not e.done]
            if not active:
                return
            prompts, live = [], []
            for ep in active:
                ids = self._prompt_ids(ep)
                if ids is None:
                    continue
                prompts.append(ids)
                live.append(ep)
            if not live:
                continue
            t0 = time.perf_counter()
            sampling = replace(self.sampling, temperature=self.sampling.eval_temperature) if greedy else self.sampling
            seeds = [None if e.assignment.sample_seed is None else call_seed(e.assignment.sample_seed, e.index, len(e.steps))
                     for e in live]
            gens = self._generate(prompts, sampling, [f"{e.assignment.group_id}/{e.index}" for e in live],
                                  seeds if any(sd is not None for sd in seeds) else None)
            self.stats["policy_seconds"] += time.perf_counter() - t0
            for ep, ids, gen in zip(live, prompts, gens):
                self._act(ep, ids, gen)

    def _generate(self, prompts: list[list[int]], sampling: SamplingConfig, session_ids: list[str],
                  seeds: list[int | None] | None = None) -> list:
        """Ask the policy; a dead or unreachable replica is retried until Serve has replaced it.

        A lost request produced nothing the episode used, so asking again (maybe of another
        replica, maybe at a newer version) is exact: each step records the version that
        answered it. Bad requests (ValueError, TypeError) are not retried.
        """
        from ray.exceptions import RayError

        deadline = time.monotonic() + POLICY_RETRY_S
        delay = 0.5
        while True:
            try:
                if seeds is None:  # unseeded calls keep the narrower signature (test doubles, wrappers)
                    return self.policy.generate(prompts, sampling, session_ids=session_ids)
                return self.policy.generate(prompts, sampling, session_ids=session_ids, seeds=seeds)
            except (RayError, TimeoutError, ConnectionError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self.stats["policy_retries"] = self.stats.get("policy_retries", 0) + 1
                log.warning("worker %s: policy call failed (%s: %s); retrying in %.1f s", self.worker_id,
                            type(exc).__name__, str(exc)[:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _reset(self, ep: _Episode) -> None:
        t0 = time.perf_counter()
        try:
            ep.observation, ep.info = ep.env.reset(ep.assignment.task)
        except EnvInfraError as exc:
            self._fail(ep, f"reset: {exc}")
        self.stats["env_seconds"] += time.perf_counter() - t0

    def _prompt_ids(self, ep: _Episode) -> list[int] | None:
        """Render the paper prompt; shorten history if it would not fit the context."""
        budget = self.max_model_len - self.sampling.max_tokens
        for k in range(self.env_cfg.history, -1, -1):
            messages = build_messages(ep.info.get("task_description", ""), ep.history[-k:] if k else [],
                                      ep.observation, ep.info.get("admissible_actions", []), len(ep.steps),
                                      self.env_cfg)
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                return ids
        self._fail(ep, f"prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len}")
        return None

    def _act(self, ep: _Episode, prompt_ids: list[int], gen) -> None:
        self._last_version = max(self._last_version, int(gen.policy_version))
        # Lone surrogates (JSON can carry them) cannot be encoded for an env's bridge (py4j): replace them.
        text = gen.text.encode("utf-8", "replace").decode("utf-8") if isinstance(gen.text, str) else ""
        parsed = parse_action(text, self.env_cfg.max_action_chars)
        anchor = ep.observation
        reward, done, info = 0.0, False, {}
        valid, reason = parsed.valid, parsed.reason
        if parsed.valid:
            t0 = time.perf_counter()
            try:
                r = ep.env.step(parsed.action)
            except EnvInfraError as exc:
                self.stats["env_seconds"] += time.perf_counter() - t0
                self._fail(ep, f"step {len(ep.steps)}: {exc}")
                return
            self.stats["env_seconds"] += time.perf_counter() - t0
            self.stats["env_steps"] += 1
            reward, done, info = float(r.reward), bool(r.done), dict(r.info)
            ep.observation = r.observation
            ep.info = {**ep.info, **info}
            ep.won = ep.won or bool(info.get("won", False))
            ep.score = float(info.get("score", ep.score))
            if info.get("admissible") is False:  # None: the env gives no action list
                ep.inadmissible += 1
                if self.env_cfg.inadmissible_is_invalid:
                    valid, reason = False, "inadmissible"
        played = info.get("action", parsed.action)  # the admissible action it was projected to, if it was
        if "projected_from" in info:
            ep.projected += 1
        ep.history.append((anchor, played if parsed.valid else text[:80]))
        step_info = {"projected_from": info["projected_from"]} if "projected_from" in info else {}
        if not valid:
            step_info.update(admissible=len(info.get("admissible_actions", ep.info.get("admissible_actions", []))),
                             reason=reason)
        ep.steps.add(observation=anchor, action=played, reward=reward, valid=valid, done=done,
                     prompt_ids=prompt_ids, response_ids=gen.token_ids, logprobs=gen.logprobs,
                     policy_version=int(gen.policy_version), info=step_info)
        if done or len(ep.steps) >= self.env_cfg.max_steps:
            ep.done = True

    def _fail(self, ep: _Episode, reason: str) -> None:
        log.warning("worker %s: infrastructure failure in %s: %s", self.worker_id, ep.assignment.task.task_id, reason)
        ep.infra_failure, ep.failure_reason, ep.done = True, reason, True
        self.stats["infra_failures"] += 1

    @staticmethod
    def _fields(ep: _Episode) -> dict[str, Any]:
        return {"won": ep.won, "score": ep.score, "task_type": ep.info.get("task_type", ep.assignment.task.task_type),
                "infra_failure": ep.infra_failure, "failure_reason": ep.failure_reason}

    @classmethod
    def _record(cls, ep: _Episode) -> EpisodeRecord:
        return columnar_group([ep.steps], [cls._fields(ep)], task_id=ep.assignment.task.task_id).episodes[0]

    def _finish(self, a: Assignment, eps: list[_Episode], push: bool) -> GroupSummary:
        fields = [self._fields(e) for e in eps]
        versions = [v for e in eps for v in e.steps.pv]
        group = columnar_group(
            [e.steps for e in eps], fields, task_id=a.task.task_id, env_name=a.task.env_name,
            task_type=fields[0]["task_type"] or a.task.task_type, worker_id=self.worker_id,
            # A group whose episodes all failed before any step carries the newest
            # version this worker has seen, so it is not mistaken for a stale one.
            policy_version=min(versions) if versions else self._last_version, group_id=a.group_id,
            finished_at=time.time())
        records = group.episodes
        pushed = False
        if push and self.buffer is not None:
            self.buffer.push(group)
            pushed = True
        self.stats["groups"] += 1
        self.stats["episodes"] += len(records)
        return GroupSummary(
            group_id=a.group_id, task_id=a.task.task_id, task_type=group.task_type, episodes=len(records),
            steps=sum(len(e.steps) for e in eps), successes=sum(e.won for e in records),
            invalid_steps=sum(e.steps.invalid_steps for e in eps),
            inadmissible_steps=sum(e.inadmissible for e in eps), projected_steps=sum(e.projected for e in eps),
            infra_failures=sum(e.infra_failure for e in records), policy_version=group.policy_version,
            pushed=pushed)
