"""Elastic rollout on a multi-node local Ray cluster (issue 7 item 4), run as its own process.

Started by tests/integration/test_elastic_cluster.py in a subprocess, because it needs a Ray
cluster of its own (``ray.cluster_utils.Cluster``: a head and worker nodes as real raylet
processes) while the test session already runs a single-node Ray.

Scenario, mirroring the KubeRay RayJob (rollout actors need the custom resource ``rollout``,
which only the rollout worker group's nodes advertise):
 1. head node only (no ``rollout`` resource) + policy endpoint, learner, Redis;
 2. a rollout node joins -> the worker is placed on it -> iteration 1 trains;
 3. a second rollout node joins, the pool scales to 2 -> workers on both nodes -> iteration 2;
 4. the first rollout node leaves (its raylet is killed) -> its worker is replaced on the
    surviving node -> iteration 3 trains; the buffer's counts match (nothing lost or doubled).
Prints one JSON line with what it saw; exits 0 only if every check held.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def _actor_nodes(class_name: str) -> dict[str, str]:
    import ray
    from ray.util.state import list_actors

    # Name this cluster explicitly: other Ray instances may run on the same machine.
    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return {a.actor_id: a.node_id for a in alive}


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray
    from ray.cluster_utils import Cluster

    from services.buffer import EmbeddedRedis
    from services.config import load_config
    from services.driver import TrainingRun
    from services.serving.tiny_model import build_tiny_model
    from tests.fixtures.serving_fixtures import SERVING_CORPUS

    work = tempfile.mkdtemp(prefix="proxmo-elastic-")
    model_dir = build_tiny_model(os.path.join(work, "model"), SERVING_CORPUS * 10, vocab_size=1024, seed=0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6})
    redis = EmbeddedRedis(data_dir=os.path.join(work, "redis"))
    url = redis.start()
    ray.init(address=cluster.address, namespace="proxmo-elastic", log_to_driver=False)
    cfg = load_config(None, [
        "run_name=elastic", f"output_dir={work}", "iterations=3", "eval_episodes=2", "checkpoint_every=1",
        f"buffer.url={url}", f"model.path={model_dir}", "model.tiny=false", "env.max_steps=3",
        "rollout.group_size=2", "rollout.envs_per_worker=2", "rollout.num_workers=1", "rollout.min_workers=1",
        "rollout.max_workers=2", "rollout.num_cpus=0.5", "rollout.resources={rollout: 1}",
        "learner.groups_per_batch=2", "learner.num_cpus=0.5", "sampling.max_tokens=8",
        "serving.num_cpus=0.25", "serving.gpu_memory_utilization=0.1", "serving.port=0", "ray.dashboard=false",
    ])
    seen: dict[str, object] = {}
    run = TrainingRun(cfg)
    try:
        run.start()
        import ray as _ray

        _ray.get(run.learner.sync_endpoint.remote())
        node_a = cluster.add_node(num_cpus=2, resources={"rollout": 1})
        _wait(lambda: len(_actor_nodes("_RolloutActor")) == 1, 120, "worker never placed on the rollout node")
        seen["it1_nodes"] = sorted(set(_actor_nodes("_RolloutActor").values()))
        assert seen["it1_nodes"] == [node_a.node_id], seen
        run.pool.run(run.assignments(0))
        _ray.get(run.learner.train_iteration.remote(2))

        # Each worker takes a whole unit of "rollout": node A holds one, node B two (room for the
        # worker that replaces A's when A leaves).
        node_b = cluster.add_node(num_cpus=2, resources={"rollout": 2})
        run.pool.scale(2)
        _wait(lambda: len(_actor_nodes("_RolloutActor")) == 2, 120, "second worker never placed")
        run.pool.run(run.assignments(1))
        _ray.get(run.learner.train_iteration.remote(2))
        seen["it2_nodes"] = sorted(set(_actor_nodes("_RolloutActor").values()))
        assert set(seen["it2_nodes"]) == {node_a.node_id, node_b.node_id}, seen

        cluster.remove_node(node_a, allow_graceful=False)
        run.pool.run(run.assignments(2))  # the dead worker's chunk is re-run on a replacement
        _ray.get(run.learner.train_iteration.remote(2))
        _ray.get(run.learner.finish.remote())
        seen["it3_nodes"] = sorted(set(_actor_nodes("_RolloutActor").values()))
        assert seen["it3_nodes"] == [node_b.node_id], seen
        stats = _ray.get(run.learner.stats.remote())
        seen["replaced"] = run.pool.replaced
        seen["stats"] = stats
        assert stats["produced"] == 6 and stats["acked"] + stats["dropped_stale"] == 6 and stats["pending"] == 0, stats
    finally:
        run.close()
        ray.shutdown()
        cluster.shutdown()
        redis.stop()
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
