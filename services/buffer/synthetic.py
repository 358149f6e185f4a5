"""Synthetic episode groups with the shape of real multi-turn rollouts (tests and benchmarks).

Why not random bytes: compression and throughput depend on the structure of
real records. Prompts of one task share a long prefix (system prompt, task
text) and, step to step, the recent history; G episodes of a group share the
task; log-probs are float noise that does not compress.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from services.contracts import EpisodeRecord, EpisodeSteps, GroupRecord, StepRecord, columnar_group


def make_group(
    episodes: int = 8,
    steps: int = 50,
    prompt_tokens: int = 1000,
    response_tokens: int = 24,
    policy_version: int = 0,
    vocab: int = 32_000,
    seed: int = 0,
    task_id: str | None = None,
    worker_id: str = "synthetic",
) -> GroupRecord:
    """One group of ``episodes`` x ``steps`` turns with ~``prompt_tokens``-token prompts."""
    rng = np.random.default_rng(seed)
    prefix_len = max(1, int(prompt_tokens * 0.6))
    prefix = rng.integers(0, vocab, prefix_len, dtype=np.int32)  # system prompt + task text
    eps = []
    for e in range(episodes):
        history: list[np.ndarray] = []
        step_records = []
        for t in range(steps):
            obs = rng.integers(0, vocab, max(1, (prompt_tokens - prefix_len) // 3), dtype=np.int32)
            history = (history + [obs])[-3:]  # the last observations stay in the prompt
            prompt = np.concatenate([prefix, *history])[:prompt_tokens]
            resp = rng.integers(0, vocab, response_tokens, dtype=np.int32)
            done = t == steps - 1
            step_records.append(
                StepRecord(
                    observation=f"task {seed} room {t % 5}: you see a table and {t % 3} apples",
                    action=f"take apple {t % 3}",
                    reward=10.0 if done and e % 2 == 0 else 0.0,
                    valid=bool(rng.random() > 0.1),
                    done=done,
                    prompt_ids=prompt,
                    response_ids=resp,
                    logprobs=-rng.exponential(1.0, response_tokens).astype(np.float32),
                    policy_version=policy_version,
                    info={"admissible": int(rng.integers(5, 12)), "score": float(t)},
                )
            )
        eps.append(EpisodeRecord(steps=step_records, won=e % 2 == 0, score=float(e % 2 == 0), task_type="pick"))
    return GroupRecord(
        task_id=task_id or f"task-{seed}",
        episodes=eps,
        env_name="synthetic",
        task_type="pick",
        worker_id=worker_id,
        policy_version=policy_version,
    )


def small_group(policy_version: int = 0, seed: int = 0) -> GroupRecord:
    """A small group (8 episodes x 3 steps, 64-token prompts) for fast tests."""
    return make_group(episodes=8, steps=3, prompt_tokens=64, response_tokens=8,
                      policy_version=policy_version, seed=seed)


_EPISODE_FIELDS = tuple(f.name for f in fields(EpisodeRecord) if f.name != "steps")
_GROUP_FIELDS = tuple(f.name for f in fields(GroupRecord) if f.name != "episodes")


def replay(g: GroupRecord) -> tuple[list[EpisodeSteps], list[dict], dict]:
    """``g``'s steps appended to :class:`EpisodeSteps` as a rollout worker records them, with the
    episode and group fields: ``columnar_group(*replay(g))`` is ``g`` in columnar form."""
    logs = []
    for e in g.episodes:
        log = EpisodeSteps()
        for s in e.steps:
            log.add(observation=s.observation, action=s.action, reward=s.reward, valid=s.valid, done=s.done,
                    prompt_ids=s.prompt_ids, response_ids=s.response_ids, logprobs=s.logprobs,
                    policy_version=s.policy_version, info=s.info)
        logs.append(log)
    eps = [{k: getattr(e, k) for k in _EPISODE_FIELDS} for e in g.episodes]
    return logs, eps, {k: getattr(g, k) for k in _GROUP_FIELDS}


def columnar(g: GroupRecord) -> GroupRecord:
    """``g`` rebuilt through :class:`EpisodeSteps` (see :func:`replay`)."""
    logs, eps, fields = replay(g)
    return columnar_group(logs, eps, **fields)
