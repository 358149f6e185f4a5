"""Security rules of the manifests (issue 9): nothing exposed outside the cluster
without an explicit opt-in, Redis only with a password from a Secret, with AOF on a
volume, and behind a NetworkPolicy that admits the Ray pods and nothing else; pods
run as non-root without privilege escalation. One Check per object looked at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .objects import (
    OPT_IN,
    RAY_KINDS,
    Check,
    cluster_spec,
    container_mounts,
    containers,
    env_map,
    is_redis_container,
    make_check,
    name_of,
    opted_in,
    pod_templates,
    ray_docs,
    secret_env,
    selector_matches,
)


def rule_security_context(docs, ctx) -> Iterator[Check]:
    """Non-root, no privilege escalation, no host namespaces (issue 9)."""
    for tpl in pod_templates(docs):
        errors, pod_sc = [], tpl.spec.get("securityContext") or {}
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if tpl.spec.get(key):
                errors.append(f"{key} is not allowed")
        for c in containers(tpl.spec):
            sc = c.get("securityContext") or {}
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                errors.append(f"container {c.get('name')}: runAsNonRoot must be true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                errors.append(f"container {c.get('name')}: runAsUser 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"container {c.get('name')}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                errors.append(f"container {c.get('name')}: privileged")
        yield make_check("security-context", tpl.where, errors)
    for doc in ray_docs(docs):
        sc = ((cluster_spec(doc) or {}).get("autoscalerOptions") or {}).get("securityContext") or {}
        errors = [] if sc.get("allowPrivilegeEscalation") is False and sc.get("runAsNonRoot") is True else \
            ["autoscalerOptions.securityContext needs runAsNonRoot: true and allowPrivilegeEscalation: false"]
        yield make_check("security-context", f"{name_of(doc)} autoscaler", errors)


def rule_exposure(docs, ctx) -> Iterator[Check]:
    """Dashboard, Serve and Redis stay inside the cluster unless explicitly opted in."""
    for doc in docs:
        kind, spec, errors = doc.get("kind"), doc.get("spec") or {}, []
        if kind == "Service":
            if spec.get("type", "ClusterIP") != "ClusterIP" and not opted_in(doc):
                errors.append(f"Service type {spec.get('type')} exposes it outside the cluster "
                              f"(annotate {OPT_IN}: \"true\" to opt in)")
            if spec.get("externalIPs") and not opted_in(doc):
                errors.append("externalIPs without opt-in")
        elif kind in ("Ingress", "Gateway", "HTTPRoute") and not opted_in(doc):
            errors.append(f"{kind} without the {OPT_IN} opt-in")
        elif kind in RAY_KINDS:
            cspec = cluster_spec(doc) or {}
            head = cspec.get("headGroupSpec") or {}
            if head.get("serviceType", "ClusterIP") != "ClusterIP" and not opted_in(doc):
                errors.append(f"headGroupSpec.serviceType {head.get('serviceType')} without opt-in")
            if head.get("enableIngress") and not opted_in(doc):
                errors.append("headGroupSpec.enableIngress without opt-in")
            svc_type = ((spec.get("serveService") or {}).get("spec") or {}).get("type", "ClusterIP")
            if svc_type != "ClusterIP" and not opted_in(doc):
                errors.append(f"serveService type {svc_type} without opt-in")
        else:
            continue
        yield make_check("exposure", name_of(doc), errors)
    for tpl in pod_templates(docs):
        errors = [f"container {c.get('name')}: hostPort {p.get('hostPort')}"
                  for c in containers(tpl.spec) for p in c.get("ports") or [] if p.get("hostPort")]
        if errors and opted_in(tpl.owner):
            errors = []
        yield make_check("exposure", tpl.where, errors)


_VAR_REF = re.compile(r"\$[({]?(\w+)")
_URL_SECRET = re.compile(r"^rediss?://(?:[^:@/]*):\$\((\w+)\)@([^:/]+)")


def rule_redis_auth(docs, ctx) -> Iterator[Check]:
    """Redis servers require a password from a Secret; clients take it from a Secret."""
    for tpl in pod_templates(docs):
        errors = []
        for c in containers(tpl.spec):
            if is_redis_container(c):
                text = " ".join(str(x) for x in (c.get("command") or []) + (c.get("args") or []))
                after = text.partition("requirepass")[2]
                placeholder = bool(re.match(r"""^\s*["']?(%s|\$)""", after))
                refs = _VAR_REF.findall(after)
                if "requirepass" not in text:
                    errors.append(f"container {c.get('name')}: redis-server without requirepass")
                elif not placeholder or not any(secret_env(c, r) for r in refs):
                    errors.append(f"container {c.get('name')}: requirepass must come from an env var set "
                                  "from a Secret (secretKeyRef), not a literal")
                if "--appendonly yes" not in text:
                    errors.append(f"container {c.get('name')}: AOF off (--appendonly yes)")
                data = container_mounts(tpl.spec, c).get("/data")
                if data is None or not ("persistentVolumeClaim" in data or data.get("name") in tpl.claim_templates):
                    errors.append(f"container {c.get('name')}: /data is not on a PersistentVolume")
            url = env_map(c).get("REDIS_URL")
            if url is not None:
                match = _URL_SECRET.match(str(url.get("value", "")))
                if not match or not secret_env(c, match.group(1)):
                    errors.append(f"container {c.get('name')}: REDIS_URL must be redis://:$(VAR)@host with VAR "
                                  "from a Secret, never a literal password")
        yield make_check("redis-auth", tpl.where, errors)
    for doc in docs:
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            yield make_check("redis-auth", name_of(doc), ["a Secret with data is committed; create it with kubectl"])


def _redis_services(docs) -> dict[str, set[str]]:
    """Service name -> names of the Redis workloads behind it."""
    out: dict[str, set[str]] = {}
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selector = (svc.get("spec") or {}).get("selector") or {}
        for tpl in pod_templates(docs):
            if selector and any(is_redis_container(c) for c in containers(tpl.spec)) \
                    and selector_matches({"matchLabels": selector}, tpl.labels):
                out.setdefault(svc["metadata"]["name"], set()).add(tpl.where)
    return out


def rule_redis_separation(docs, ctx) -> Iterator[Check]:
    """The GCS fault-tolerance Redis is not the trajectory buffer's, and has a Secret password."""
    services = _redis_services(docs)
    buffer_backends: set[str] = set()
    for tpl in pod_templates(docs):
        for c in containers(tpl.spec):
            match = _URL_SECRET.match(str((env_map(c).get("REDIS_URL") or {}).get("value", "")))
            if match:
                buffer_backends |= services.get(match.group(2).split(".")[0], {match.group(2)})
    for doc in ray_docs(docs):
        ft = (cluster_spec(doc) or {}).get("gcsFaultToleranceOptions")
        if not ft:
            continue
        errors = []
        host = str(ft.get("redisAddress", "")).split("://")[-1].split(":")[0].split(".")[0]
        backends = services.get(host, {host})
        if backends & buffer_backends:
            errors.append(f"GCS fault tolerance uses the trajectory-buffer Redis ({host}); use a separate one")
        if not host:
            errors.append("gcsFaultToleranceOptions.redisAddress is empty")
        pw = ft.get("redisPassword") or {}
        if not ((pw.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
            errors.append("gcsFaultToleranceOptions.redisPassword must be valueFrom.secretKeyRef")
        yield make_check("redis-separation", name_of(doc), errors)


def rule_networkpolicy(docs, ctx) -> Iterator[Check]:
    """Each Redis is reachable only from Ray pods, on its port, and those pods can reach it."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    ray_pods = [t for t in pod_templates(docs) if t.owner.get("kind") in RAY_KINDS]
    for tpl in pod_templates(docs):
        if not any(is_redis_container(c) for c in containers(tpl.spec)):
            continue
        errors = []
        mine = [p for p in policies if selector_matches((p.get("spec") or {}).get("podSelector") or {}, tpl.labels)]
        if not mine:
            errors.append("no NetworkPolicy selects these Redis pods")
        allowed: list[dict[str, Any]] = []
        for pol in mine:
            spec = pol.get("spec") or {}
            if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
                errors.append(f"{name_of(pol)}: policyTypes lacks Ingress")
            for i, rule in enumerate(spec.get("ingress") or []):
                peers = rule.get("from") or []
                if not peers:
                    errors.append(f"{name_of(pol)} ingress[{i}]: no `from` (open to every source)")
                for peer in peers:
                    if set(peer) != {"podSelector"} or not (peer["podSelector"] or {}).get("matchLabels"):
                        errors.append(f"{name_of(pol)} ingress[{i}]: peers must be labelled pod selectors "
                                      f"(got {sorted(peer)})")
                    else:
                        allowed.append(peer["podSelector"])
                ports = [p.get("port") for p in rule.get("ports") or []]
                if not ports or any(p not in (6379, "redis") for p in ports):
                    errors.append(f"{name_of(pol)} ingress[{i}]: ports must be exactly the Redis port, got {ports}")
        for sel in allowed:
            if not any(selector_matches(sel, t.labels) for t in ray_pods):
                errors.append(f"allowed selector {sel.get('matchLabels')} matches no Ray pod")
            if any(selector_matches(sel, t.labels) for t in pod_templates(docs) if t.owner.get("kind") not in RAY_KINDS):
                errors.append(f"allowed selector {sel.get('matchLabels')} also matches non-Ray pods")
        if allowed:
            name = tpl.owner["metadata"]["name"]
            for t in ray_pods:
                for c in containers(t.spec):
                    match = _URL_SECRET.match(str((env_map(c).get("REDIS_URL") or {}).get("value", "")))
                    if match and match.group(2).split(".")[0] in _services_for(docs, tpl) and \
                            not any(selector_matches(s, t.labels) for s in allowed):
                        errors.append(f"{t.where} uses {name} but its labels are not allowed by the policy")
        yield make_check("networkpolicy", tpl.where, errors)


def _services_for(docs, tpl) -> set[str]:
    return {s for s, backends in _redis_services(docs).items() if tpl.where in backends}


def rule_service_selectors(docs, ctx) -> Iterator[Check]:
    """Each Service selects pods that this rendering creates (a typo leaves it empty)."""
    templates = list(pod_templates(docs))
    for svc in (d for d in docs if d.get("kind") == "Service"):
        selector = (svc.get("spec") or {}).get("selector") or {}
        errors = []
        if selector and not any(selector_matches({"matchLabels": selector}, t.labels) for t in templates):
            errors.append(f"selector {selector} matches no pod template")
        yield make_check("service-selectors", name_of(svc), errors)
