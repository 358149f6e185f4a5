"""Rules that no schema expresses but that decide whether a deployment works.

KubeRay enforces some of these only when it reconciles (a bad RayJob is accepted by
the API server and fails minutes later); others are this project's contract
between the manifests, the config tree and the code (the learner needs a GPU where
it is scheduled; rollout actors need the custom resource a worker group advertises);
the rest are the security promises of issue 9 (no exposed dashboard, Redis only
with a password from a Secret and behind a NetworkPolicy).

Each rule yields one :class:`Check` per object it looked at, so a clean run reports
what was checked, not only what failed.
"""

from __future__ import annotations

import functools
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .objects import (
    GPU_KEY,
    RAY_KINDS,
    Check,
    Context,
    Group,
    ceil_gpus,
    cluster_spec,
    containers,
    env_map,
    groups,
    make_check,
    name_of,
    pod_templates,
    quantity,
    ray_docs,
)
from .schemas import load_serve_config
from .security import (
    rule_exposure,
    rule_networkpolicy,
    rule_redis_auth,
    rule_redis_separation,
    rule_security_context,
    rule_service_selectors,
)

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KUBERAY_PORTS = {6379: "gcs-server", 8265: "dashboard", 10001: "client", 8080: "metrics", 8000: "serve"}
# KubeRay appends 6 characters to RayJob/RayService names to name their RayCluster.
_NAME_LIMIT = {"RayCluster": 63, "RayJob": 57, "RayService": 57}


# --------------------------------------------------------------------------- KubeRay run-time rules


def rule_replicas(docs, ctx) -> Iterator[Check]:
    """minReplicas <= replicas <= maxReplicas, none negative (KubeRay rejects at reconcile)."""
    for doc in ray_docs(docs):
        for g in groups(doc):
            if g.is_head:
                continue
            errors = []
            lo, hi, n = g.spec.get("minReplicas"), g.spec.get("maxReplicas"), g.spec.get("replicas")
            if lo is None or hi is None:
                errors.append("minReplicas and maxReplicas must both be set")
            elif lo < 0 or hi < 0:
                errors.append(f"negative replicas (min {lo}, max {hi})")
            elif lo > hi:
                errors.append(f"minReplicas {lo} > maxReplicas {hi}")
            elif n is not None and not lo <= n <= hi:
                errors.append(f"replicas {n} outside [{lo}, {hi}]")
            yield make_check("replicas", g.where, errors)


def rule_submission(docs, ctx) -> Iterator[Check]:
    """A RayJob the operator will actually submit and clean up."""
    for doc in docs:
        if doc.get("kind") != "RayJob":
            continue
        spec, errors = doc.get("spec") or {}, []
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"submissionMode {mode!r} is not one of {list(SUBMISSION_MODES)}")
        if mode != "InteractiveMode" and not str(spec.get("entrypoint", "")).strip():
            errors.append(f"submissionMode {mode} needs an entrypoint")
        if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
            errors.append("SidecarMode does not take submitterPodTemplate/submitterConfig")
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            errors.append("exactly one of rayClusterSpec and clusterSelector must be set")
        if spec.get("rayClusterSpec") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("shutdownAfterJobFinishes must be true: a finished training job must release its GPUs")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append("ttlSecondsAfterFinished must be >= 0")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("a suspended RayJob needs shutdownAfterJobFinishes: true")
        yield make_check("submission", name_of(doc), errors)


def rule_autoscaling(docs, ctx) -> Iterator[Check]:
    """In-tree autoscaling on, and the rollout group free to grow (issue 7)."""
    for doc in ray_docs(docs):
        spec, errors = cluster_spec(doc) or {}, []
        if spec.get("enableInTreeAutoscaling") is not True:
            errors.append("enableInTreeAutoscaling must be true")
        idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds", 0)
        if idle < 0:
            errors.append("autoscalerOptions.idleTimeoutSeconds must be >= 0")
        for g in groups(doc):
            if g.spec.get("suspend") and spec.get("enableInTreeAutoscaling"):
                errors.append(f"group {g.name} cannot be suspended with the autoscaler on")
            if g.name == "rollout" and g.spec.get("maxReplicas", 0) <= g.spec.get("minReplicas", 0):
                errors.append("the rollout group must be able to scale (maxReplicas > minReplicas)")
        yield make_check("autoscaling", name_of(doc), errors)


def rule_operator(docs, ctx) -> Iterator[Check]:
    """Checks KubeRay makes only when it reconciles (names, rayStartParams, GCS FT env)."""
    for doc in ray_docs(docs):
        errors, kind = [], doc["kind"]
        name = str((doc.get("metadata") or {}).get("name", ""))
        if not _DNS1035.match(name) or len(name) > _NAME_LIMIT[kind]:
            errors.append(f"name {name!r} must be a DNS-1035 label of at most {_NAME_LIMIT[kind]} characters")
        spec = cluster_spec(doc) or {}
        for g in groups(doc):
            params = g.spec.get("rayStartParams") or {}
            if "labels" in params:
                errors.append(f"group {g.name}: rayStartParams.labels is not supported (use the labels field)")
            if g.spec.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                errors.append(f"group {g.name}: resources set both in rayStartParams and the resources field")
            try:
                g.custom_resources()
            except (ValueError, TypeError) as exc:
                errors.append(f"group {g.name}: rayStartParams.resources is not a JSON object string: {exc}")
            if not g.is_head and not _DNS1123.match(g.name):
                errors.append(f"group name {g.name!r} must be a DNS-1123 label")
        head = groups(doc)[0] if groups(doc) else None
        for port in (head.ray_container.get("ports") or []) if head else []:
            expected = _KUBERAY_PORTS.get(port.get("containerPort"))
            if expected and port.get("name") != expected:
                errors.append(f"head port {port.get('containerPort')} is named {port.get('name')!r}; KubeRay "
                              f"builds its head Service from port names and expects {expected!r}")
        if spec.get("gcsFaultToleranceOptions") and head is not None:
            env = env_map(head.ray_container)
            for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
                if var in env:
                    errors.append(f"head env {var} conflicts with gcsFaultToleranceOptions (KubeRay rejects it)")
            if (head.spec.get("rayStartParams") or {}).get("redis-password"):
                errors.append("rayStartParams.redis-password conflicts with gcsFaultToleranceOptions")
        yield make_check("operator", name_of(doc), errors)


# --------------------------------------------------------------------------- project contract


def _config_of(doc, docs, ctx) -> tuple[Any, list[str]]:
    """The TrainConfig mounted into a Ray CR's head (loaded with services.config)."""
    head = groups(doc)[0] if groups(doc) else None
    if head is None:
        return None, ["no head group"]
    volume = head.mounts().get(ctx.config_mount)
    if volume is None or "configMap" not in volume:
        return None, [f"head does not mount a ConfigMap at {ctx.config_mount}"]
    cm_name = volume["configMap"].get("name")
    cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"].get("name") == cm_name]
    if not cms:
        return None, [f"ConfigMap {cm_name} is not part of this rendering"]
    text = (cms[0].get("data") or {}).get("config.yaml")
    if text is None:
        return None, [f"ConfigMap {cm_name} has no key config.yaml"]
    cfg, error = _load_config_text(text)
    return (cfg, []) if error is None else (None, [f"ConfigMap {cm_name}: {error}"])


@functools.lru_cache(maxsize=32)
def _load_config_text(text: str) -> tuple[Any, str | None]:
    """load_config on a config file's text (cached: every rule asks for the same few)."""
    from services.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        try:
            return load_config(path), None
        except ConfigError as exc:
            return None, str(exc)


def rule_config(docs, ctx) -> Iterator[Check]:
    """The mounted config loads and is set up for a cluster (Ray address, Redis URL)."""
    for doc in ray_docs(docs):
        cfg, errors = _config_of(doc, docs, ctx)
        head = groups(doc)[0]
        if cfg is not None:
            if doc["kind"] != "RayService" and not cfg.ray.address:
                errors.append("config ray.address is empty: the driver would start its own local Ray")
            has_url = "REDIS_URL" in env_map(head.ray_container)
            if doc["kind"] != "RayService" and not cfg.buffer.url and not has_url:
                errors.append("no buffer Redis: config buffer.url is empty and the head has no REDIS_URL "
                              "(an embedded Redis on the head is unreachable from rollout pods)")
        if doc["kind"] == "RayJob":
            args = shlex.split(str((doc.get("spec") or {}).get("entrypoint", "")))
            if "--config" in args:
                path = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""
                if not path.startswith(ctx.config_mount.rstrip("/") + "/"):
                    errors.append(f"entrypoint --config {path!r} is not under the mounted {ctx.config_mount}")
        yield make_check("config", name_of(doc), errors)


def rule_custom_resources(docs, ctx) -> Iterator[Check]:
    """Every custom resource rollout actors request is advertised by some worker group."""
    for doc in ray_docs(docs):
        if doc["kind"] == "RayService":
            continue
        cfg, errors = _config_of(doc, docs, ctx)
        if cfg is None:
            continue  # reported by rule_config
        advertised: dict[str, float] = {}
        for g in groups(doc):
            try:
                for k, v in g.custom_resources().items():
                    advertised[k] = max(advertised.get(k, 0.0), v)
            except (ValueError, TypeError):
                pass  # reported by rule_operator
        for key, need in cfg.rollout.resources.items():
            if advertised.get(key, 0.0) < need:
                errors.append(f"rollout actors need resource {key}={need} but no worker group advertises it")
        yield make_check("custom-resources", name_of(doc), errors)


def _gpu_groups(doc) -> list[Group]:
    return [g for g in groups(doc) if g.gpus_per_pod() > 0]


def rule_gpu(docs, ctx) -> Iterator[Check]:
    """GPUs exist (as limits) where the learner and the policy replicas are scheduled."""
    for tpl in pod_templates(docs):
        errors = []
        for c in containers(tpl.spec):
            res = c.get("resources") or {}
            req, lim = (res.get("requests") or {}).get(GPU_KEY), (res.get("limits") or {}).get(GPU_KEY)
            if req is not None and lim is None:
                errors.append(f"container {c.get('name')}: {GPU_KEY} in requests but not in limits")
            elif req is not None and quantity(req) != quantity(lim):
                errors.append(f"container {c.get('name')}: {GPU_KEY} requests != limits")
            tag = str(c.get("image", "")).rsplit(":", 1)[-1]
            if lim is not None and quantity(lim) > 0 and tag.endswith("-cpu"):
                errors.append(f"container {c.get('name')}: GPU limit with the CPU image ({tag})")
        yield make_check("gpu", tpl.where, errors)
    for doc in ray_docs(docs):
        errors = []
        for g in groups(doc):
            declared = (g.spec.get("rayStartParams") or {}).get("num-gpus")
            if declared is not None and float(declared) > g.gpus_per_pod():
                errors.append(f"group {g.name}: rayStartParams num-gpus {declared} but {GPU_KEY} limit "
                              f"{g.gpus_per_pod():g}")
        capacity = sum(g.gpus_per_pod() * int(g.spec.get("maxReplicas", 0)) for g in _gpu_groups(doc))
        per_pod = max([g.gpus_per_pod() for g in _gpu_groups(doc)] or [0.0])
        needs: list[tuple[str, float, float]] = []  # (what, per actor, total)
        if doc["kind"] == "RayService":
            for app in load_serve_config(doc).get("applications") or []:
                for dep in app.get("deployments") or []:
                    gpus = float((dep.get("ray_actor_options") or {}).get("num_gpus", 0) or 0)
                    auto = dep.get("autoscaling_config") or {}
                    n = auto.get("max_replicas", dep.get("num_replicas", 1))
                    needs.append((f"deployment {dep.get('name')}", gpus, gpus * (n if isinstance(n, int) else 1)))
        else:
            cfg, _ = _config_of(doc, docs, ctx)
            if cfg is not None:
                needs.append(("learner", cfg.learner.num_gpus, cfg.learner.num_gpus))
                s = cfg.serving
                needs.append(("policy replicas", s.num_gpus, s.num_gpus * s.min_replicas))
        for what, each, _total in needs:
            if each > 0 and per_pod < ceil_gpus(each) and not (each < 1 and per_pod > 0):
                errors.append(f"{what} needs {each:g} GPU per actor but no worker group has {GPU_KEY} limits "
                              f"that large (largest: {per_pod:g})")
        total_need = sum(t for _, _, t in needs)
        if total_need > capacity + 1e-9:
            errors.append(f"needs {total_need:g} GPUs at once but GPU groups hold at most {capacity:g}")
        yield make_check("gpu", name_of(doc), errors)


def rule_checkpoints(docs, ctx) -> Iterator[Check]:
    """Checkpoints live on a PersistentVolumeClaim wherever they are written or read."""
    for doc in ray_docs(docs):
        errors = []
        if doc["kind"] == "RayService":
            paths = [str((app.get("args") or {}).get("checkpoint", ""))
                     for app in load_serve_config(doc).get("applications") or []]
            where = [g for g in groups(doc) if not g.is_head]
        else:
            cfg, _ = _config_of(doc, docs, ctx)
            if cfg is None:
                continue
            paths = [cfg.output_dir]
            # written by the driver (head) and the learner (a GPU group, or any group on CPU)
            where = [g for g in groups(doc) if g.is_head or g in _gpu_groups(doc)] or groups(doc)
            if cfg.learner.num_gpus == 0:
                where = [g for g in groups(doc) if g.is_head or g.name != "rollout"]
        for path in paths:
            if not path.startswith("/"):
                errors.append(f"checkpoint path {path!r} must be absolute (a mount of a PVC)")
                continue
            for g in where:
                backed = [m for m, vol in g.mounts().items()
                          if (path + "/").startswith(m.rstrip("/") + "/") and "persistentVolumeClaim" in vol]
                if not backed:
                    errors.append(f"group {g.name}: {path} is not on a PersistentVolumeClaim mount")
        claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
        for g in groups(doc):
            for vol in g.mounts().values():
                claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
                if claim and claim not in claims:
                    errors.append(f"group {g.name}: PVC {claim} is not part of this rendering")
        yield make_check("checkpoints", name_of(doc), errors)


def rule_image_version(docs, ctx) -> Iterator[Check]:
    """Our image tag <-> rayVersion <-> the ray pin in pyproject.toml; other images pinned."""
    for doc in ray_docs(docs):
        spec, errors = cluster_spec(doc) or {}, []
        if str(spec.get("rayVersion")) != ctx.ray_version:
            errors.append(f"rayVersion {spec.get('rayVersion')!r} != ray pinned in pyproject.toml ({ctx.ray_version})")
        tags = set()
        for g in groups(doc):
            image = str(g.ray_container.get("image", ""))
            repo, _, tag = image.rpartition(":")
            if not repo.endswith("/" + ctx.image_repo_suffix) and repo != ctx.image_repo_suffix:
                errors.append(f"group {g.name}: image {image!r} is not the project image (*/{ctx.image_repo_suffix})")
            elif not ctx.tag_pattern.match(tag):
                errors.append(f"group {g.name}: image tag {tag!r} must be "
                              f"{ctx.project_version}-ray{ctx.ray_version}-(cpu|cuNNN)")
            tags.add(tag)
        if len(tags) > 1:
            errors.append(f"head and workers use different image tags {sorted(tags)}")
        yield make_check("image-version", name_of(doc), errors)
    for tpl in pod_templates(docs):
        if tpl.owner.get("kind") in RAY_KINDS and not tpl.where.endswith("submitter"):
            continue
        errors = []
        for c in containers(tpl.spec):
            image = str(c.get("image", ""))
            last = image.rsplit("/", 1)[-1]
            if "@" not in last and (":" not in last or last.endswith(":latest")):
                errors.append(f"container {c.get('name')}: image {image!r} needs a fixed tag (not latest)")
        yield make_check("image-version", tpl.where, errors)


# --------------------------------------------------------------------------- resources


def rule_resources(docs, ctx) -> Iterator[Check]:
    """cpu and memory requests and limits on every container, requests <= limits."""
    def check_one(label: str, res: dict[str, Any]) -> list[str]:
        errs = []
        for kind in ("requests", "limits"):
            for key in ("cpu", "memory"):
                if key not in (res.get(kind) or {}):
                    errs.append(f"{label}: no {kind}.{key}")
        for key, req in (res.get("requests") or {}).items():
            lim = (res.get("limits") or {}).get(key)
            try:
                if lim is not None and quantity(req) > quantity(lim):
                    errs.append(f"{label}: requests.{key} {req} > limits.{key} {lim}")
            except ValueError as exc:
                errs.append(f"{label}: {exc}")
        return errs

    for tpl in pod_templates(docs):
        errors = []
        for c in containers(tpl.spec):
            errors += check_one(f"container {c.get('name')}", c.get("resources") or {})
        yield make_check("resources", tpl.where, errors)
    for doc in ray_docs(docs):
        spec = cluster_spec(doc) or {}
        if spec.get("enableInTreeAutoscaling"):
            res = (spec.get("autoscalerOptions") or {}).get("resources") or {}
            yield make_check("resources", f"{name_of(doc)} autoscaler", check_one("autoscaler sidecar", res))


RULES: list[tuple[str, Callable[..., Iterator[Check]]]] = [
    ("service-selectors", rule_service_selectors),
    ("replicas", rule_replicas),
    ("submission", rule_submission),
    ("autoscaling", rule_autoscaling),
    ("operator", rule_operator),
    ("config", rule_config),
    ("custom-resources", rule_custom_resources),
    ("gpu", rule_gpu),
    ("checkpoints", rule_checkpoints),
    ("image-version", rule_image_version),
    ("resources", rule_resources),
    ("security-context", rule_security_context),
    ("exposure", rule_exposure),
    ("redis-auth", rule_redis_auth),
    ("redis-separation", rule_redis_separation),
    ("networkpolicy", rule_networkpolicy),
]


def run_rules(docs: list[dict[str, Any]], ctx: Context) -> list[Check]:
    """Every rule over one rendering. A rule that crashes is a failed check, not a crash."""
    out: list[Check] = []
    for name, fn in RULES:
        try:
            out.extend(fn(docs, ctx))
        except Exception as exc:  # a malformed object must be reported, not abort the run
            out.append(Check(name, "<rendering>", (f"rule crashed on malformed input: {type(exc).__name__}: {exc}",)))
    return out
