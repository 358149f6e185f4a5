"""A policy endpoint replica killed mid-request: requests are retried, the new replica serves the
current weights. Real Ray Serve + vLLM CPU replica (the session's ``policy_app``), real game,
real RolloutWorker and Redis stream.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.buffer import TrajectoryBuffer
from services.config import EnvConfig, RolloutConfig, SamplingConfig
from services.rollout import Assignment, RolloutWorker
from services.serving.client import sampling_dict
from tests.faults.common import report_counts

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

MAX_MODEL_LEN = 512  # tests/fixtures/serving_fixtures.py


class _Watched:
    """The real client, counting answers and failed calls.

    Once armed, the next call asks for a long fixed-length answer, so the kill lands while the
    replica is still generating it (a normal 8-token answer can finish before ``ray.kill`` does).
    """

    def __init__(self, client):
        self._client = client
        self.failures: list[str] = []
        self.answered = 0
        self._armed = False
        self.long_in_flight = threading.Event()

    def arm(self) -> None:
        self._armed = True

    def generate(self, prompts, sampling, **kwargs):
        if self._armed:
            self._armed = False
            room = MAX_MODEL_LEN - max(len(p) for p in prompts) - 1
            sampling = {**sampling_dict(sampling), "max_tokens": max(16, min(256, room)), "ignore_eos": True}
            self.long_in_flight.set()
        try:
            out = self._client.generate(prompts, sampling, **kwargs)
            self.answered += 1
            return out
        except Exception as exc:
            self.failures.append(type(exc).__name__)
            raise


def _replica_actor(app_name: str, replica_id: str):
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

    from services.serving.app import DEPLOYMENT_NAME

    return ray.get_actor(f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app_name}#{DEPLOYMENT_NAME}#{replica_id}", namespace="serve")


def test_killed_replica_is_replaced_and_serves_current_weights(policy_app, redis_url, buffer_cfg):
    import ray

    client = policy_app.client
    app_name = policy_app.deployment.serving_cfg.app_name
    v1 = policy_app.next_version()
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: t + 0.01 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
                 for k, t in policy_app.initial_state.items()}
    client.publish_weights(perturbed, v1)
    client.wait_for_version(v1, 120)
    old = client.replica_versions()
    assert old and set(old.values()) == {v1}

    watched = _Watched(client)
    buf = TrajectoryBuffer(buffer_cfg, redis_url, consumer="endpoint-faults")
    worker = RolloutWorker("w-endpoint", EnvConfig(max_steps=4), RolloutConfig(group_size=2, envs_per_worker=2),
                           SamplingConfig(max_tokens=8), str(policy_app.model_dir), policy=watched, buffer=buf)
    tasks = worker._env(0).sample_tasks("train", 3, seed=21)
    result: dict = {}

    def play():
        try:
            result["out"] = worker.run([Assignment(t, group_id=f"endpoint-fault/g{i}") for i, t in enumerate(tasks)])
        except BaseException as exc:
            result["error"] = exc

    th = threading.Thread(target=play, daemon=True)
    try:
        th.start()
        deadline = time.monotonic() + 180
        while watched.answered < 2 and time.monotonic() < deadline:  # a few turns on the old replica
            time.sleep(0.01)
        assert watched.answered >= 2, "the worker never got answers from the policy"
        watched.arm()
        while not watched.long_in_flight.is_set():  # then kill while the next (long) request is in flight
            time.sleep(0.002)
        time.sleep(0.1)  # it has reached the replica
        for rid in old:
            ray.kill(_replica_actor(app_name, rid), no_restart=True)
        t_kill = time.monotonic()
        # Weights move on while no replica is up: the replacement must load these, not the old ones.
        v2 = v1 + 1
        client.publish_weights(policy_app.initial_state, v2)
        th.join(timeout=600)
        assert not th.is_alive(), "rollout did not finish after the replica was replaced"
        assert "error" not in result, result.get("error")
        recovered_s = time.monotonic() - t_kill
        new = client.replica_versions()
        assert new and not set(new) & set(old), (old, new)  # a new replica
        assert set(new.values()) == {v2}, new  # serving the current weights

        got = []
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            got += buf.read(3, block_ms=1000)
        versions = [s.policy_version for d in got for e in d.group.episodes for s in e.steps]
        assert set(versions) <= {v1, v2} and v1 in versions and v2 in versions, versions
        assert versions[-1] == v2  # everything after the kill came from the replacement
        retries = worker.get_stats().get("policy_retries", 0)
        print(f"\n[faults] replica killed mid-request: failed_calls={watched.failures} retries={retries} "
              f"recovered_in_s={recovered_s:.1f} steps_v1={versions.count(v1)} steps_v2={versions.count(v2)}")
        assert retries >= 1 and watched.failures, "the request in flight at the kill must fail and be retried"
        buf.ack([d.msg_id for d in got])
        st = buf.stats()
        counts = report_counts("endpoint replica killed", st)
        assert (st["produced"], st["consumed"], st["acked"], counts["lost"], counts["unsettled"]) == (3, 3, 3, 0, 0)
    finally:
        th.join(timeout=5)
        worker.close()
        buf.close()
        policy_app.restore_initial(timeout_s=300)
