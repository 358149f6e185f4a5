"""PolicyClient: how rollout workers, the learner and the driver talk to the policy.

One client for three targets, so callers do not care where the policy runs:
- a Serve ``DeploymentHandle`` (the normal case: per-prompt calls, routed by
  session id to keep an episode on one replica),
- an HTTP base URL (``/v1/completions`` with token-id prompts; no Ray needed),
- a :class:`~services.serving.server.PolicyServer` object in the same process
  (tests, single-process debugging).

Weights go the other way: :meth:`publish_weights` packs the state dict once
(safetensors), puts it into the object store once and records the version in the
WeightStore; replicas pull it. :meth:`wait_for_version` returns when every live
replica serves at least that version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from services.config import SamplingConfig
from services.serving.weights import pack_state_dict, pack_state_dict_array


@dataclass
class Generation:
    """One sampled continuation and the policy version that produced every token of it."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: int
    swap_aborted: bool = False  # a weight swap cut this request short (finish_reason "abort")

    @classmethod
    def from_result(cls, r: dict[str, Any]) -> Generation:
        return cls(list(r["token_ids"]), [float(x) for x in r["logprobs"]], r["text"], r["finish_reason"],
                   int(r["policy_version"]), bool(r.get("swap_aborted", False)))


def sampling_dict(sampling: SamplingConfig | dict[str, Any], *, greedy: bool = False) -> dict[str, Any]:
    if isinstance(sampling, dict):
        return dict(sampling)
    temperature = sampling.eval_temperature if greedy else sampling.temperature
    return {"temperature": temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}


def _check_prompts(prompt_ids: list[list[int]], session_ids: list[str] | None,
                   seeds: list[int | None] | None = None) -> None:
    if not isinstance(prompt_ids, list) or not all(isinstance(p, list) for p in prompt_ids):
        raise TypeError("prompt_ids must be a list of token-id lists")
    if session_ids is not None and len(session_ids) != len(prompt_ids):
        raise ValueError(f"{len(session_ids)} session_ids for {len(prompt_ids)} prompts")
    if seeds is not None:
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        if not all(s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63) for s in seeds):
            raise ValueError("seeds must be None or ints in [0, 2**63)")


def _per_prompt(params: dict[str, Any], seeds: list[int | None] | None, n: int) -> list[dict[str, Any]]:
    """Sampling parameters of each prompt: ``params`` plus its own ``seed`` where one is given."""
    if seeds is None:
        return [params] * n
    return [params if s is None else {**params, "seed": int(s)} for s in seeds]


class PolicyClient:
    """Generate from, publish weights to, and scale the policy endpoint."""

    def __init__(self, target: Any, *, weight_store: Any = None, app_name: str = "proxmo-policy",
                 deployment_name: str = "PolicyServer", request_timeout_s: float = 120.0) -> None:
        self.target = target
        self.store = weight_store
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.request_timeout_s = request_timeout_s
        self.scaler: Any = None  # set by deploy_policy: set_replicas(min, max=None)
        self._running_cache, self._running_at = 1, -1e9
        self._pack_out = None  # publish_weights' packing buffer, reused across versions
        if isinstance(target, str):
            self.mode = "http"
            self.base_url = target.rstrip("/")
        elif type(target).__name__ == "DeploymentHandle":  # answers hasattr() for any name
            self.mode = "handle"
        elif type(target).__name__ in ("DeploymentHandle", "_DeploymentHandleBase"):
            self.mode = "handle"
        elif callable(getattr(target, "apply_weights", None)):
            self.mode = "local"  # a PolicyServer in this process
        else:
            raise TypeError(f"PolicyClient target must be a DeploymentHandle, a base URL or a PolicyServer, "
                            f"got {type(target).__name__}")

    # ------------------------------------------------------------------ generation

    async def agenerate(self, prompt_ids: list[list[int]], sampling: SamplingConfig | dict[str, Any], *,
                        min_version: int | None = None, session_ids: list[str] | None = None,
                        seeds: list[int | None] | None = None) -> list[Generation]:
        """Sample one continuation per prompt. ``seeds``: a sampling seed per prompt (None: unseeded);
        the same seed, prompt and weights give the same tokens (paired evaluation relies on it)."""
        _check_prompts(prompt_ids, session_ids, seeds)
        params = sampling_dict(sampling)
        per = _per_prompt(params, seeds, len(prompt_ids))
        sids = session_ids or [None] * len(prompt_ids)
        if self.mode == "http":
            return await self._http_generate(prompt_ids, per, min_version, sids)
        if self.mode == "local":
            coros = [self.target.generate(p, prm, session_id=s, min_version=min_version)
                     for p, prm, s in zip(prompt_ids, per, sids)]
            return [Generation.from_result(r) for r in await asyncio.gather(*coros)]
        if session_ids is None and seeds is None:  # no affinity wanted: one call per replica-sized chunk
            chunks = self._chunks(prompt_ids)
            calls = [self.target.generate_batch.remote(c, params, min_version=min_version) for c in chunks]
            parts = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.request_timeout_s)
            return [Generation.from_result(r) for part in parts for r in part]
        calls = [self.target.generate.remote(p, prm, session_id=s, min_version=min_version)
                 for p, prm, s in zip(prompt_ids, per, sids)]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=self.request_timeout_s)
        return [Generation.from_result(r) for r in results]

    def _chunks(self, prompt_ids: list[list[int]]) -> list[list[list[int]]]:
        """Split a batch evenly over the running replicas (one Serve call each, order kept).

        Per-prompt calls cost a routing probe and an actor call each, which on a small
        machine takes CPU from the engine; prompts without a session id need no affinity.
        """
        now = time.monotonic()
        if now - self._running_at > 5.0:
            self._running_cache = max(1, self.running_replicas() or 1)
            self._running_at = now
        k = min(self._running_cache, len(prompt_ids)) or 1
        size = -(-len(prompt_ids) // k)
        return [prompt_ids[i: i + size] for i in range(0, len(prompt_ids), size)]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig | dict[str, Any], *,
                 min_version: int | None = None, session_ids: list[str] | None = None,
                 seeds: list[int | None] | None = None) -> list[Generation]:
        """Blocking version of :meth:`agenerate` (not for use inside a running event loop)."""
        _check_prompts(prompt_ids, session_ids, seeds)
        if self.mode != "handle":
            return asyncio.run(self.agenerate(prompt_ids, sampling, min_version=min_version,
                                              session_ids=session_ids, seeds=seeds))
        params = sampling_dict(sampling)
        if session_ids is None and seeds is None:
            calls = [self.target.generate_batch.remote(c, params, min_version=min_version)
                     for c in self._chunks(prompt_ids)]
            return [Generation.from_result(r) for c in calls for r in c.result(timeout_s=self.request_timeout_s)]
        sids = session_ids or [None] * len(prompt_ids)
        calls = [self.target.generate.remote(p, prm, session_id=s, min_version=min_version)
                 for p, prm, s in zip(prompt_ids, _per_prompt(params, seeds, len(prompt_ids)), sids)]
        return [Generation.from_result(c.result(timeout_s=self.request_timeout_s)) for c in calls]

    async def _http_generate(self, prompt_ids: list[list[int]], per: list[dict[str, Any]],
                             min_version: int | None, sids: list[str | None]) -> list[Generation]:
        import httpx

        async def one(client: httpx.AsyncClient, prompt: list[int], params: dict[str, Any],
                      sid: str | None) -> Generation:
            body = {"model": self.app_name, "prompt": prompt, "logprobs": 0, **params}
            if min_version is not None:
                body["min_policy_version"] = min_version
            headers = {"x-session-id": sid} if sid else {}
            resp = await client.post(f"{self.base_url}/v1/completions", json=body, headers=headers)
            if resp.status_code != 200:
                raise RuntimeError(f"policy endpoint returned {resp.status_code}: {resp.text[:500]}")
            choice = resp.json()["choices"][0]
            return Generation(list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]],
                              choice["text"], choice["finish_reason"], int(choice["policy_version"]),
                              bool(choice.get("swap_aborted", False)))

        async with httpx.AsyncClient(timeout=self.request_timeout_s) as client:
            return list(await asyncio.gather(*(one(client, p, prm, s) for p, prm, s in zip(prompt_ids, per, sids))))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pack_out"] = None  # a model-sized buffer: never shipped with the client
        return state

    # ------------------------------------------------------------------ weights

    def _require_store(self) -> Any:
        if self.store is None:
            raise RuntimeError("this PolicyClient has no WeightStore (create it with deploy_policy, "
                               "or pass weight_store=...); an HTTP-only client cannot publish weights")
        return self.store

    def publish_weights(self, state_dict: dict[str, Any], version: int) -> None:
        """Make ``state_dict`` the weights of ``version``; replicas pick it up by themselves."""
        store = self._require_store()
        if hasattr(store.publish, "remote"):
            import ray

            # ray.put copies the array into the object store, so the next version reuses it.
            self._pack_out = pack_state_dict_array(state_dict, out=self._pack_out)
            ref = ray.put(self._pack_out)
            ray.get(store.publish.remote(version, [ref]))
        else:
            store.publish(version, [pack_state_dict(state_dict)])

    def _replica_versions(self) -> dict[str, int]:
        store = self._require_store()
        if hasattr(store.replicas, "remote"):
            import ray

            return ray.get(store.replicas.remote())
        return store.replicas()

    def running_replicas(self) -> int | None:
        """Replicas Serve reports RUNNING (None when not behind Serve)."""
        if self.mode != "handle":
            return None
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return 0
        dep = app.deployments.get(self.deployment_name)
        return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0

    def replica_versions(self) -> dict[str, int]:
        """Live replica id -> the version it serves."""
        return self._replica_versions()

    def wait_for_version(self, version: int, timeout_s: float = 300.0) -> None:
        """Block until every live replica serves >= ``version``; TimeoutError with the state otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            versions = self._replica_versions()
            running = self.running_replicas()
            behind = {r: v for r, v in versions.items() if v < version}
            need = running if running is not None else max(1, len(versions))
            if not behind and len(versions) >= need and need > 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"wait_for_version({version}): replicas {versions}, running={running}")
            time.sleep(0.05)

    def set_replicas(self, min_replicas: int, max_replicas: int | None = None, *, wait: bool = True) -> None:
        if self.scaler is None:
            raise RuntimeError("set_replicas needs a client made by deploy_policy")
        self.scaler(min_replicas, max_replicas, wait=wait)
