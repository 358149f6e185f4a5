"""Composition root of the policy endpoint: Ray Serve deployment, WeightStore actor, HTTP.

``build_policy_app`` wraps the plain :class:`PolicyServer` in a Serve deployment
with an OpenAI-compatible FastAPI ingress (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``), autoscaling from
:class:`ServingConfig`, fractional CPUs, and the session-affinity router.
``deploy_policy`` also starts the named WeightStore actor and returns a
:class:`PolicyDeployment` holding a ready :class:`PolicyClient`.

Replica count changes (``set_replicas``) redeploy the app with a new autoscaling
range. Serve 2.60 gives a ``serve.run`` redeploy a fresh code version, so it
rolls the replicas (there is no public lightweight path for Python-deployed apps
with autoscaling; the external-scaler REST API excludes built-in autoscaling).
That is safe because every new replica loads the current weights in its
constructor before it takes traffic; the cost is one engine start per replica.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class
# in the route signatures defined inside _deployment_class().
import dataclasses
import logging
import socket
from dataclasses import dataclass
from typing import Any

from services.config import ModelConfig, ServingConfig
from services.serving.client import PolicyClient
from services.serving.server import PolicyServer, StaleVersionError
from services.serving.weights import WeightStore

__all__ = ["PolicyServer", "PolicyDeployment", "build_policy_app", "deploy_policy", "store_name"]

log = logging.getLogger(__name__)
DEPLOYMENT_NAME = "PolicyServer"


def store_name(serving_cfg: ServingConfig) -> str:
    return f"{serving_cfg.app_name}-weights"


def _replica_args(serving_cfg: ServingConfig) -> ServingConfig:
    """Constructor config without the replica range (replicas never need it)."""
    return dataclasses.replace(serving_cfg, min_replicas=1, max_replicas=1)


def _autoscaling(serving_cfg: ServingConfig, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "initial_replicas": min_replicas,
            "target_ongoing_requests": serving_cfg.target_ongoing_requests,
            "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}


def _deployment_class() -> type:
    """The Serve-facing subclass: async init (pull current weights) + HTTP routes."""
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from services.serving import openai_api as oa

    api = FastAPI(title="proxmo policy")

    @serve.ingress(api)
    class PolicyReplica(PolicyServer):
        async def __init__(self, model_cfg: ModelConfig, serving_cfg: ServingConfig, store: str,
                           namespace: str) -> None:
            handle = ray.get_actor(store, namespace=namespace)
            rid = serve.get_replica_context().replica_id.unique_id
            PolicyServer.__init__(self, model_cfg, serving_cfg, weight_store=handle, replica_id=rid)
            await self.start()  # current weights before the first request (issue 4, item 2)

        def _model_name(self) -> str:
            return self.cfg.app_name

        async def _run(self, parse, fmt, request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except Exception:
                return JSONResponse(oa.error_body("body is not valid JSON"), status_code=400)
            headers = {k.lower(): v for k, v in request.headers.items()}
            try:
                req = parse(body, self.tokenizer, 16, headers)
                results = await self.generate_batch(req.prompts, req.sampling, min_version=req.min_version)
            except (oa.RequestError, ValueError) as exc:
                return JSONResponse(oa.error_body(str(exc)), status_code=400)
            except StaleVersionError as exc:
                return JSONResponse(oa.error_body(str(exc), "stale_policy_version"), status_code=409)
            except TimeoutError as exc:
                return JSONResponse(oa.error_body(str(exc), "timeout"), status_code=504)
            out = fmt(req, results, self.tokenizer, self._model_name())
            return JSONResponse(out, headers={"x-policy-version": str(out["policy_version"]),
                                              "x-replica-id": self.replica_id})

        @api.post("/v1/completions")
        async def http_completions(self, request: Request) -> JSONResponse:
            return await self._run(oa.parse_completion, oa.format_completion, request)

        @api.post("/v1/chat/completions")
        async def http_chat(self, request: Request) -> JSONResponse:
            return await self._run(oa.parse_chat, oa.format_chat, request)

        @api.get("/v1/models")
        async def http_models(self) -> JSONResponse:
            return JSONResponse(oa.format_models(self._model_name(), self.version),
                                headers={"x-policy-version": str(self.version)})

        @api.get("/health")
        async def http_health(self) -> JSONResponse:
            try:
                info = await self.health()
            except Exception as exc:
                return JSONResponse({"status": "unhealthy", "error": str(exc)}, status_code=503)
            return JSONResponse(info, headers={"x-policy-version": str(self.version)})

        async def __del__(self) -> None:  # Serve awaits async __del__ on graceful shutdown
            await self.close()

    return PolicyReplica


def build_policy_app(model_cfg: ModelConfig, serving_cfg: ServingConfig, *, namespace: str | None = None,
                     min_replicas: int | None = None, max_replicas: int | None = None) -> Any:
    """Serve application for the policy (bind only; ``deploy_policy`` runs it)."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    ns = namespace or ray.get_runtime_context().namespace
    lo = serving_cfg.min_replicas if min_replicas is None else min_replicas
    hi = serving_cfg.max_replicas if max_replicas is None else max(max_replicas, lo)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": serving_cfg.num_cpus, "num_gpus": serving_cfg.num_gpus},
        "autoscaling_config": _autoscaling(serving_cfg, lo, hi),
        "max_ongoing_requests": serving_cfg.max_ongoing_requests,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": serving_cfg.swap_drain_timeout_s,
    }
    if serving_cfg.session_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="services.serving.router:SessionAffinityRouter")
    if serving_cfg.num_gpus > 0 and serving_cfg.tensor_parallel_size > 1:
        # vLLM's Ray executor places one worker per GPU inside the replica's placement group.
        options["placement_group_bundles"] = (
            [{"CPU": serving_cfg.num_cpus, "GPU": 1}] + [{"GPU": 1}] * (serving_cfg.tensor_parallel_size - 1))
        options["placement_group_strategy"] = "STRICT_PACK"
    deployment = serve.deployment(_deployment_class()).options(**options)
    return deployment.bind(model_cfg, _replica_args(serving_cfg), store_name(serving_cfg), ns)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class PolicyDeployment:
    """A running policy app: its client, HTTP base URL and controls."""

    model_cfg: ModelConfig
    serving_cfg: ServingConfig
    client: PolicyClient
    base_url: str
    handle: Any
    store: Any
    namespace: str

    def set_replicas(self, min_replicas: int, max_replicas: int | None = None, *, wait: bool = True) -> None:
        """Change the replica range while training runs (replicas roll; see the module docstring).

        ``wait`` blocks until the app is running again (new replicas have loaded the
        current weights); otherwise the update is applied from a background thread.
        """
        import threading

        from ray import serve

        if min_replicas < 1:
            raise ValueError(f"set_replicas: min_replicas must be >= 1, got {min_replicas}")
        hi = min_replicas if max_replicas is None else max_replicas
        if hi < min_replicas:
            raise ValueError(f"set_replicas: max_replicas ({hi}) < min_replicas ({min_replicas})")
        app = build_policy_app(self.model_cfg, self.serving_cfg, namespace=self.namespace,
                               min_replicas=min_replicas, max_replicas=hi)
        def apply() -> None:
            serve.run(app, name=self.serving_cfg.app_name, route_prefix=self.serving_cfg.route_prefix)

        if wait:
            apply()
        else:
            threading.Thread(target=apply, name="proxmo-set-replicas", daemon=True).start()

    def shutdown(self) -> None:
        import ray
        from ray import serve

        serve.delete(self.serving_cfg.app_name)
        try:
            ray.kill(self.store)
        except Exception:
            log.warning("could not kill the weight store actor")


def _ensure_store(serving_cfg: ServingConfig, namespace: str, options: dict[str, Any] | None = None) -> Any:
    """The named WeightStore actor replicas pull weights from (created once, then reused)."""
    import ray

    return ray.remote(WeightStore).options(
        name=store_name(serving_cfg), namespace=namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=1000, **(options or {})).remote()


def app_builder(args: dict[str, Any]) -> Any:
    """Serve import path for `serve run` and the KubeRay RayService (``serveConfigV2``).

    ``args``: ``config`` (YAML of the config tree; its ``model`` and ``serving`` sections are
    used), optional ``checkpoint`` (a trained HF folder, e.g. ``runs/<run>/checkpoints/latest``,
    which replaces ``model.path``) and optional ``overrides`` (list of ``key.path=value``).
    """
    from dataclasses import replace
    from pathlib import Path

    import ray

    from services.config import load_config

    cfg = load_config(args.get("config") or None, list(args.get("overrides") or []))
    model = replace(cfg.model, path=str(args["checkpoint"]), tiny=False) if args.get("checkpoint") else cfg.model
    if not Path(model.path, "config.json").is_file():
        raise FileNotFoundError(f"app_builder: no Hugging Face model folder at {model.path!r} (no config.json); "
                                "set args.checkpoint or model.path to a trained checkpoint")
    ns = ray.get_runtime_context().namespace
    _ensure_store(cfg.serving, ns)
    return build_policy_app(model, cfg.serving, namespace=ns)


def deploy_policy(model_cfg: ModelConfig, serving_cfg: ServingConfig, *, port: int | None = None,
                  store_options: dict[str, Any] | None = None) -> PolicyDeployment:
    """Start the WeightStore actor and the Serve app (Ray must be initialised); wait until ready.

    ``port=0`` picks a free port (tests run several Ray clusters side by side).
    """
    import ray
    from ray import serve

    ns = ray.get_runtime_context().namespace
    store = _ensure_store(serving_cfg, ns, store_options)
    http_port = serving_cfg.port if port is None else (port or _free_port(serving_cfg.host))
    serve.start(http_options={"host": serving_cfg.host, "port": http_port})
    handle = serve.run(build_policy_app(model_cfg, serving_cfg, namespace=ns), name=serving_cfg.app_name,
                       route_prefix=serving_cfg.route_prefix)
    base_url = f"http://{serving_cfg.host}:{http_port}{serving_cfg.route_prefix.rstrip('/')}"
    client = PolicyClient(handle, weight_store=store, app_name=serving_cfg.app_name,
                          deployment_name=DEPLOYMENT_NAME, request_timeout_s=serving_cfg.request_timeout_s)
    dep = PolicyDeployment(model_cfg, serving_cfg, client, base_url, handle, store, ns)
    client.scaler = dep.set_replicas
    return dep
