"""Small views over rendered Kubernetes objects, shared by the rules.

Rules reason about "pod templates" and "Ray groups" whatever object holds them
(a StatefulSet, a RayJob's head group, its submitter), so this module flattens
those shapes once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
GPU_KEY = "nvidia.com/gpu"


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        return spec
    if kind == "RayJob":
        return spec.get("rayClusterSpec")
    if kind == "RayService":
        return spec.get("rayClusterConfig")
    return None


@dataclass
class Group:
    """One Ray node group (head or worker) of a Ray custom resource."""

    owner: dict[str, Any]
    name: str
    spec: dict[str, Any]
    is_head: bool

    @property
    def pod(self) -> dict[str, Any]:
        return (self.spec.get("template") or {}).get("spec") or {}

    @property
    def labels(self) -> dict[str, str]:
        """Template labels plus those KubeRay adds to every Pod it creates for the group."""
        own = ((self.spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        added = {"ray.io/node-type": "head" if self.is_head else "worker", "ray.io/group": self.name,
                 "ray.io/is-ray-node": "yes"}
        if self.owner.get("kind") == "RayCluster":  # RayJob/RayService clusters get generated names
            added["ray.io/cluster"] = str((self.owner.get("metadata") or {}).get("name"))
        return {**own, **added}

    @property
    def ray_container(self) -> dict[str, Any]:
        containers = self.pod.get("containers") or [{}]
        return containers[0]

    @property
    def where(self) -> str:
        return f"{name_of(self.owner)} group {self.name}"

    def gpus_per_pod(self) -> float:
        limits = (self.ray_container.get("resources") or {}).get("limits") or {}
        return quantity(limits.get(GPU_KEY, 0))

    def custom_resources(self) -> dict[str, float]:
        """Custom Ray resources the group advertises (rayStartParams or the resources field)."""
        import json

        raw = (self.spec.get("rayStartParams") or {}).get("resources")
        out: dict[str, float] = {}
        if raw:
            text = raw.strip()
            if text.startswith('"') and text.endswith('"'):
                text = text[1:-1].replace('\\"', '"')
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ValueError("rayStartParams.resources must be a JSON object")
            out.update({str(k): float(v) for k, v in parsed.items()})
        for key, value in (self.spec.get("resources") or {}).items():
            if key not in ("CPU", "GPU", "memory", "TPU"):
                out[key] = quantity(value)
        return out

    def mounts(self) -> dict[str, dict[str, Any]]:
        """mountPath -> volume (as declared in the pod) for the Ray container."""
        return container_mounts(self.pod, self.ray_container)


def groups(doc: dict[str, Any]) -> list[Group]:
    spec = cluster_spec(doc)
    if not spec:
        return []
    out = [Group(doc, "head", spec.get("headGroupSpec") or {}, True)]
    for g in spec.get("workerGroupSpecs") or []:
        out.append(Group(doc, str(g.get("groupName")), g, False))
    return out


def container_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    out = {}
    for m in container.get("volumeMounts") or []:
        out[str(m.get("mountPath"))] = volumes.get(m.get("name"), {"name": m.get("name"), "_missing": True})
    return out


@dataclass
class PodTemplate:
    where: str
    owner: dict[str, Any]
    spec: dict[str, Any]
    labels: dict[str, str]
    claim_templates: tuple[str, ...] = ()  # StatefulSet volumeClaimTemplates names


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[PodTemplate]:
    """Every pod template in the rendering, whichever object holds it."""
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec") or {}
        if kind in _WORKLOADS:
            tpl = spec.get("template") or {}
            claims = tuple(str((c.get("metadata") or {}).get("name")) for c in spec.get("volumeClaimTemplates") or [])
            yield PodTemplate(name_of(doc), doc, tpl.get("spec") or {},
                              (tpl.get("metadata") or {}).get("labels") or {}, claims)
        elif kind == "CronJob":
            tpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
            yield PodTemplate(name_of(doc), doc, tpl.get("spec") or {}, (tpl.get("metadata") or {}).get("labels") or {})
        elif kind == "Pod":
            yield PodTemplate(name_of(doc), doc, spec, (doc.get("metadata") or {}).get("labels") or {})
        elif kind in RAY_KINDS:
            for g in groups(doc):
                yield PodTemplate(g.where, doc, g.pod, g.labels)
            if kind == "RayJob" and spec.get("submitterPodTemplate"):
                tpl = spec["submitterPodTemplate"]
                yield PodTemplate(f"{name_of(doc)} submitter", doc, tpl.get("spec") or {},
                                  (tpl.get("metadata") or {}).get("labels") or {})


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(e.get("name")): e for e in container.get("env") or []}


def secret_env(container: dict[str, Any], name: str) -> bool:
    """True when env var ``name`` comes from a Secret (valueFrom.secretKeyRef)."""
    entry = env_map(container).get(name) or {}
    return bool(((entry.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"))


def is_redis_container(container: dict[str, Any]) -> bool:
    image = str(container.get("image", "")).rsplit("/", 1)[-1]
    return image.startswith(("redis:", "redis@", "valkey:")) or image in ("redis", "valkey")


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """matchLabels / matchExpressions (In, NotIn, Exists, DoesNotExist) against labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


_QTY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")
_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "8Gi", 2) as a float; ValueError if malformed."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _QTY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number = float(match.group(1) + (match.group(2) or ""))
    return number * _SUFFIX.get(match.group(3) or "", 1.0)


def ceil_gpus(value: float) -> int:
    return int(math.ceil(value - 1e-9))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    rule: str
    target: str
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Context:
    """What the manifests must agree with: the versions pinned in pyproject.toml."""

    ray_version: str
    project_version: str
    image_repo_suffix: str = "proxmo-ray"  # our image: <registry>/<...>/proxmo-ray:<tag>
    config_mount: str = "/etc/proxmo"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.project_version)}-ray{re.escape(self.ray_version)}-(cpu|cu\d+)$")


OPT_IN = "proxmo.io/expose-outside-cluster"


def make_check(rule: str, target: str, errors: list[str]) -> Check:
    return Check(rule, target, tuple(errors))


def ray_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in RAY_KINDS]


def opted_in(doc: dict[str, Any]) -> bool:
    return ((doc.get("metadata") or {}).get("annotations") or {}).get(OPT_IN) == "true"
