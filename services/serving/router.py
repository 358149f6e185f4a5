"""Session affinity: route every turn of one episode to the same replica.

Consecutive turns of an episode share a long prompt prefix (system text, task,
history), so sending them to the replica that served the previous turn lets
vLLM's prefix cache skip most of the prefill. We use rendezvous (highest random
weight) hashing of ``(session_id, replica_id)``: it needs no shared state, and
adding or removing a replica moves only the sessions that hashed to it.

The preferred replica is the first rank; all others form the second rank, so a
full or dead replica never blocks a request. Requests without a session id get
two random candidates (the least loaded wins), like Serve's default router.
Affinity applies to DeploymentHandle calls (``generate(..., session_id=...)``),
which is how rollout workers call the policy; HTTP requests are routed by the
proxy before their body is read, so they get the default behaviour.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def rendezvous_order(session_id: str, replica_ids: list[str]) -> list[str]:
    """Replica ids ordered by preference for ``session_id`` (stable, hash-based)."""
    def score(rid: str) -> bytes:
        return hashlib.blake2b(f"{session_id}|{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


def session_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    kwargs: dict[str, Any] = pending_request.kwargs or {}
    sid = kwargs.get("session_id")
    return str(sid) if sid else None


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: sticky by ``session_id`` kwarg, two random choices otherwise."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        sid = session_of(pending_request)
        if sid is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = rendezvous_order(sid, list(by_id))
        ranks = [[by_id[order[0]]]]
        if len(order) > 1:
            ranks.append([by_id[rid] for rid in order[1:]])
        return ranks
