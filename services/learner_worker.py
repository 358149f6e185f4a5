"""The learner actor: reads groups from the buffer, updates, publishes, checkpoints, acks.

A plain class wrapping :class:`~services.learner.Learner` with its injected
trajectory buffer and policy client; the driver makes it a Ray actor (on a GPU
when the cluster has one). One call of :meth:`train_iteration` is the paper's
iteration, as named stages:

    collect (XREADGROUP, staleness rule) -> update (proxmo advantages + PPO)
    -> publish (new version to every endpoint replica) -> checkpoint -> ack

Records are acknowledged only after the checkpoint that contains their update
is on disk (issue 3): a crash between the update and the checkpoint leaves them
pending, and the restarted learner, resumed from the last checkpoint, consumes
them again. Nothing is acked without its update, nothing is counted twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from proxmo.config import AdvantageConfig, LossConfig
from services.config import BufferConfig, LearnerConfig
from services.learner import Learner

log = logging.getLogger(__name__)


class LearnerWorker:
    def __init__(self, model_path: str, cfg: LearnerConfig, algorithm: AdvantageConfig, loss: LossConfig,
                 buffer_cfg: BufferConfig, buffer_url: str, policy, checkpoint_dir: str,
                 *, checkpoint_every: int = 1, consumer: str = "learner-0", dtype: str = "float32",
                 torch_threads: int = 0, temperature: float = 1.0, group_prefix: str = ""):
        import torch

        from services.buffer import TrajectoryBuffer

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.learner = Learner(model_path, cfg, algorithm, loss, dtype=dtype, temperature=temperature)
        self.buffer = TrajectoryBuffer(buffer_cfg, buffer_url, consumer=consumer)
        self.policy = policy
        self.group_prefix = group_prefix  # ids of this run's groups start with it ("" accepts every group)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_every = max(int(checkpoint_every), 1)
        self.unacked: list[str] = []
        self.iteration = 0
        # After a resume the checkpoint's weights are re-published under a new version; versions
        # the lost learner published after that checkpoint are replayed one to one (issue 9).
        self._resumed_version: int | None = None
        self._version_shift: tuple[int, int] | None = None  # (first new version, new - old)
        self.idle_seconds = 0.0
        self.busy_seconds = 0.0

    # ------------------------------------------------------------------ stages

    def collect(self, n_groups: int, timeout_s: float) -> tuple[list[Any], list[str], dict[str, float]]:
        """Consume ``n_groups`` groups (the number the driver dispatched for this iteration).

        Stale groups (more than ``buffer.max_staleness`` versions behind) are dropped,
        acked and counted by the buffer; the batch is then smaller, but the learner
        never waits for groups that will not come.
        """
        groups, ids, dropped = [], [], 0
        deadline = time.monotonic() + timeout_s
        while len(groups) + dropped < n_groups:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"learner waited {timeout_s:.0f} s for {n_groups} groups, got {len(groups) + dropped}; buffer "
                    f"counts {self.buffer.stats()} (duplicates: pushes of group ids the buffer had already seen; "
                    "dead: entries it could not use, see the dead letters)")
            deliveries = self._own(self.buffer.read(n_groups - len(groups) - dropped, block_ms=1000))
            fresh, stale = self._split_stale(deliveries)
            if stale:
                log.warning("dropped %d stale group(s) (versions %s, learner at %d)", len(stale),
                            [d.group.policy_version for d in stale], self.learner.version)
            dropped += len(stale)
            groups.extend(d.group for d in fresh)
            ids.extend(d.msg_id for d in fresh)
        lags = [self.lag(g.policy_version) for g in groups] or [0]
        return groups, ids, {"buffer/dropped_stale": float(dropped), "staleness/mean": sum(lags) / len(lags),
                             "staleness/max": float(max(lags))}

    def _own(self, deliveries):
        """This run's deliveries; another run's groups (same stream on a shared Redis) are dead-lettered."""
        if not self.group_prefix:
            return deliveries
        own = []
        for d in deliveries:
            if d.group.group_id.startswith(self.group_prefix):
                own.append(d)
            else:
                self.buffer.reject(d.msg_id, f"group of another run (this run's ids start with {self.group_prefix!r})")
        return own

    def lag(self, policy_version: int) -> int:
        """Policy versions between a group's sampler and the weights this learner holds now.

        After a resume, a version ``v`` older than the re-published checkpoint counts as
        ``v + shift``: the replayed iterations consume the same groups in the same order as
        the lost learner did, so they redo its updates, and a group it sampled at ``v`` is as
        far from the replay as it was from the original (the staleness rule stays the same).
        """
        v = int(policy_version)
        if self._version_shift is not None and v < self._version_shift[0]:
            v += self._version_shift[1]
        return self.learner.version - v

    def _split_stale(self, deliveries):
        if self._version_shift is None:
            return self.buffer.split_stale(deliveries, self.learner.version)
        fresh, stale = [], []
        for d in deliveries:  # one call per group: each has its own effective version
            f, s = self.buffer.split_stale([d], d.group.policy_version + self.lag(d.group.policy_version))
            fresh += f
            stale += s
        return fresh, stale

    def publish(self, timeout_s: float = 300.0) -> float:
        """Send the new weights to every replica and wait until all serve them."""
        t0 = time.perf_counter()
        self.learner.version += 1
        self.policy.publish_weights(self.learner.state_dict(), self.learner.version)
        self.policy.wait_for_version(self.learner.version, timeout_s)
        return time.perf_counter() - t0

    def checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        path = self.learner.save_checkpoint(self.checkpoint_dir / "latest", {"iteration": self.iteration, **(extra or {})})
        acked = self.buffer.ack(self.unacked) if self.unacked else 0
        log.info("checkpoint %s (iteration %d); acked %d records", path, self.iteration, acked)
        self.unacked = []
        return path

    # ------------------------------------------------------------------ one iteration

    def train_iteration(self, n_groups: int, timeout_s: float = 600.0) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, ids, m = self.collect(n_groups, timeout_s)
        t1 = time.perf_counter()
        if groups:
            m.update(self.learner.update(groups))
        else:
            m["skipped"] = 1.0
        t2 = time.perf_counter()
        m["time/weight_sync_s"] = sync_s = self.publish()
        self.unacked.extend(ids)
        self.iteration += 1
        if self.iteration % self.checkpoint_every == 0:
            self.checkpoint()
        t3 = time.perf_counter()
        self.idle_seconds += t1 - t0
        self.busy_seconds += t3 - t1
        m.update({"time/learner_wait_s": t1 - t0, "time/learner_step_s": t2 - t1, "time/checkpoint_s": t3 - t2 - sync_s,
                  "learner/idle_ratio": self.idle_seconds / max(self.idle_seconds + self.busy_seconds, 1e-9),
                  "policy_version": float(self.learner.version), "learner/step": float(self.learner.step)})
        m.update({f"buffer/{k}": float(v) for k, v in self.buffer.stats().items() if isinstance(v, (int, float))})
        return m

    # ------------------------------------------------------------------ control

    def resume(self, fallback_version: int | None = None) -> dict[str, Any]:
        """Load ``latest``; pending (unacked) records are re-read by the buffer afterwards.

        Without a checkpoint, ``fallback_version`` (the version the initial weights were
        published as) lets a learner that died before its first checkpoint restart from
        the initial model at iteration 0.
        """
        latest = self.checkpoint_dir / "latest"
        if fallback_version is not None and not latest.is_dir():
            self.learner.version = int(fallback_version)
            meta: dict[str, Any] = {"iteration": 0, "step": self.learner.step, "version": self.learner.version}
        else:
            meta = self.learner.load_checkpoint(latest)
        self.iteration = int(meta.get("iteration", 0))
        self._resumed_version = self.learner.version
        return meta

    def sync_endpoint(self, timeout_s: float = 300.0) -> int:
        """Publish the learner's current weights as a version newer than anything the endpoint served.

        Called once before the first rollout (fresh start or resume), so the endpoint
        serves exactly the weights the learner trains, whatever it held before.
        """
        served = max(self.policy.replica_versions().values(), default=0)
        self.learner.version = max(self.learner.version, int(served))
        self.publish(timeout_s)
        if self._resumed_version is not None:
            self._version_shift = (self.learner.version, self.learner.version - self._resumed_version)
            self._resumed_version = None
        return self.learner.version

    def finish(self) -> Path:
        """Final checkpoint; acks whatever is still unacked."""
        return self.checkpoint()

    def version(self) -> int:
        return self.learner.version

    def stats(self) -> dict[str, Any]:
        return self.buffer.stats()
