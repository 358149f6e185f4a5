"""Environment faults: an environment that raises or hangs is an infrastructure failure.

The environment is the real TextWorldExpress game wrapped by ``tests/faults/flaky_env.py``
(named by ``module:attr``, like any user environment), run by a real RolloutWorker in
this process, guarded by GuardedEnv, pushed to a real Redis stream. The group's
advantages are then computed by ``proxmo`` exactly as the learner does.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from proxmo import compute_advantages
from proxmo.config import AdvantageConfig
from services.buffer import TrajectoryBuffer
from services.config import EnvConfig, RolloutConfig, SamplingConfig
from services.learner import flatten_groups
from services.rollout import Assignment, RolloutWorker, _Episode
from services.serving.client import Generation
from tests.faults import flaky_env
from tests.faults.common import report_counts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

FLAKY = "tests.faults.flaky_env:FlakyTWX"


def _said(worker: RolloutWorker, action: str) -> Generation:
    """What the model answered this turn: a well-formed action (the env, not the model, is under test)."""
    text = f"<think></think><action>{action}</action>"
    ids = worker.tokenizer(text, add_special_tokens=False)["input_ids"]
    return Generation(ids, [-1.0] * len(ids), text, "stop", policy_version=1)


def _play(worker: RolloutWorker, a: Assignment, scripts: dict[int, str]):
    """One group of G episodes; episode k plays the game's gold path unless ``scripts[k]`` names an action."""
    g = worker.cfg.group_size
    eps = [_Episode(worker._env(k), a, k) for k in range(g)]
    for ep in eps:
        worker._reset(ep)
    gold = {k: ep.env.expert_actions() for k, ep in enumerate(eps) if not ep.done}
    while any(not ep.done for ep in eps):
        for k, ep in enumerate(eps):
            if ep.done:
                continue
            ids = worker._prompt_ids(ep)
            assert ids is not None, "prompt must fit (max_model_len is generous here)"
            action = scripts.get(k) or gold[k][min(len(ep.steps), len(gold[k]) - 1)]
            worker._act(ep, ids, _said(worker, action))
    return worker._finish(a, eps, push=True), eps


def _advantages(group, estimator: str = "grpo") -> np.ndarray:
    rows = flatten_groups([group])
    return np.asarray(compute_advantages(rows.inputs, AdvantageConfig(estimator=estimator)).advantages)


def test_env_that_raises_or_hangs_is_masked_and_recreated(tiny_model_dir, redis_url, buffer_cfg):
    base = len(flaky_env.CREATED)  # instance numbers continue across tests in this process
    env_cfg = EnvConfig(name=FLAKY, max_steps=8, step_timeout_s=2.0,
                        options={"raise_instances": [base], "hang_instances": [base + 1], "fail_at_step": 2})
    buf = TrajectoryBuffer(buffer_cfg, redis_url, consumer="env-faults")
    worker = RolloutWorker("w-env", env_cfg, RolloutConfig(group_size=4, envs_per_worker=4),
                           SamplingConfig(max_tokens=16), str(tiny_model_dir), policy=None, buffer=buf,
                           max_model_len=8192)
    try:
        tasks = worker._env(0).sample_tasks("train", 2, seed=11)
        # Wave 1: episode 0's env raises at step 2, episode 1's hangs at step 2, 2 wins, 3 loses.
        t0 = time.monotonic()
        s1, eps = _play(worker, Assignment(tasks[0], group_id="envfault/g0"), {3: "inventory"})
        elapsed = time.monotonic() - t0
        assert s1.infra_failures == 2 and s1.pushed
        assert eps[0].infra_failure and "raised RuntimeError" in eps[0].failure_reason
        assert eps[1].infra_failure and "timed out after 2.0s" in eps[1].failure_reason
        assert len(eps[0].steps) == 1 and len(eps[1].steps) == 1  # the failed step is not recorded
        assert eps[2].won and not eps[2].infra_failure
        assert not eps[3].won and not eps[3].infra_failure
        assert elapsed < 60, f"a hung env must cost one step timeout, not more ({elapsed:.1f} s)"

        # What the learner gets: flags and reasons survive the buffer.
        got = buf.read(1, block_ms=5000)
        assert len(got) == 1
        group = got[0].group
        assert [e.infra_failure for e in group.episodes] == [True, True, False, False]
        assert "raised RuntimeError" in group.episodes[0].failure_reason

        # Masked out of the group statistics, not scored as 0.
        adv = _advantages(group)
        failed_rows = np.array([t.endswith(("/0", "/1")) for t in flatten_groups([group]).inputs.traj])
        assert np.all(adv[failed_rows] == 0.0)
        survivors = replace(group, episodes=group.episodes[2:])
        np.testing.assert_allclose(adv[~failed_rows], _advantages(survivors), rtol=0, atol=1e-6)
        as_zero = replace(group, episodes=[replace(e, infra_failure=False) for e in group.episodes])
        scored = _advantages(as_zero)[~failed_rows]
        assert not np.allclose(scored, adv[~failed_rows]), "counting failures as zero changes the baseline"

        # Wave 2: the broken environments were recreated and play normally.
        s2, eps2 = _play(worker, Assignment(tasks[1], group_id="envfault/g1"), {})
        assert s2.infra_failures == 0 and all(e.won for e in eps2)
        assert worker._envs[0].restarts == 1 and worker._envs[1].restarts == 1
        assert worker._envs[2].restarts == 0 and worker._envs[3].restarts == 0
        assert worker.get_stats()["infra_failures"] == 2

        got += buf.read(1, block_ms=5000)
        assert buf.ack([d.msg_id for d in got]) == 2
        st = buf.stats()
        counts = report_counts("environment raises + hangs", st)
        assert (st["produced"], st["consumed"], st["acked"], counts["lost"], counts["unsettled"]) == (2, 2, 2, 0, 0)
    finally:
        worker.close()
        buf.close()


def test_env_failing_at_reset_with_the_real_policy(tiny_model_dir, redis_url, buffer_cfg, policy_app):
    """Through RolloutWorker.run and the real endpoint: a reset that raises fails that episode only."""
    base = len(flaky_env.CREATED)
    env_cfg = EnvConfig(name=FLAKY, max_steps=2, step_timeout_s=5.0,
                        options={"raise_instances": [base], "fail_at_step": 0})
    buf = TrajectoryBuffer(buffer_cfg, redis_url, consumer="env-faults-policy")
    worker = RolloutWorker("w-env-2", env_cfg, RolloutConfig(group_size=2, envs_per_worker=2),
                           SamplingConfig(max_tokens=8), str(policy_app.model_dir), policy=policy_app.client,
                           buffer=buf, max_model_len=512)
    try:
        tasks = worker._env(0).sample_tasks("train", 2, seed=5)
        out = worker.run([Assignment(t, group_id=f"envfault-reset/g{i}") for i, t in enumerate(tasks)])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            got += buf.read(2, block_ms=1000)
        groups = {d.group.group_id: d.group for d in got}
        first, second = groups["envfault-reset/g0"], groups["envfault-reset/g1"]
        reset_failures = [[e.failure_reason.startswith("reset:") for e in g.episodes] for g in (first, second)]
        assert reset_failures == [[True, False], [False, False]], reset_failures
        assert "injected failure" in first.episodes[0].failure_reason and not first.episodes[0].steps
        assert worker._envs[0].restarts == 1  # recreated for the second group
        assert out[0].infra_failures >= 1 and out[0].pushed and out[1].pushed
        buf.ack([d.msg_id for d in got])
        st = buf.stats()
        counts = report_counts("environment fails at reset (real policy)", st)
        assert (st["produced"], st["consumed"], st["acked"], counts["lost"], counts["unsettled"]) == (2, 2, 2, 0, 0)
    finally:
        worker.close()
        buf.close()
