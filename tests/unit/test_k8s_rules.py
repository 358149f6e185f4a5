"""Planted errors: one broken manifest per rule, each must be caught (issue 7 item 3).

The clean renderings of the overlays are the baseline: a rule that reports nothing on
the planted error, or something on the clean input, fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from services.k8s_validate import kustomize, read_pins
from services.k8s_validate.objects import groups
from services.k8s_validate.rules import run_rules

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ctx():
    return read_pins(ROOT)


@pytest.fixture(scope="module")
def rendered():
    return {name: kustomize.render_builtin(ROOT / "k8s" / "overlays" / name) for name in ("gpu", "cpu-dev")}


def _find(docs, kind, name=None):
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise KeyError((kind, name))


def _group(docs, kind, group):
    return next(g for g in groups(_find(docs, kind)) if g.name == group)


def _failures(docs, ctx, rule):
    return [e for c in run_rules(docs, ctx) if c.rule == rule for e in c.errors]


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_clean_overlays_pass_every_rule(rendered, ctx, overlay):
    failed = [(c.rule, c.target, c.errors) for c in run_rules(rendered[overlay], ctx) if not c.ok]
    assert failed == []


# --- each mutation plants one error; (rule, expected text in the error, mutation) -----------


def m_min_gt_max(docs):
    _group(docs, "RayJob", "rollout").spec["minReplicas"] = 40


def m_bad_submission_mode(docs):
    _find(docs, "RayJob")["spec"]["submissionMode"] = "K8sMode"


def m_no_shutdown(docs):
    _find(docs, "RayJob")["spec"]["shutdownAfterJobFinishes"] = False


def m_no_autoscaling(docs):
    _find(docs, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = False


def m_bad_resources_string(docs):
    _group(docs, "RayJob", "rollout").spec["rayStartParams"]["resources"] = "rollout=8"


def m_head_port_name(docs):
    ports = _group(docs, "RayJob", "head").ray_container["ports"]
    next(p for p in ports if p["containerPort"] == 6379)["name"] = "gcs"


def m_gcs_env_conflict(docs):
    head = _group(docs, "RayService", "head").ray_container
    head.setdefault("env", []).append({"name": "REDIS_PASSWORD", "value": "x"})


def m_config_unknown_key(docs):
    cm = _find(docs, "ConfigMap", "proxmo-config")
    cm["data"]["config.yaml"] += "\nlearner_typo: 1\n"


def m_config_local_ray(docs):
    cm = _find(docs, "ConfigMap", "proxmo-config")
    data = yaml.safe_load(cm["data"]["config.yaml"])
    data.pop("ray")
    cm["data"]["config.yaml"] = yaml.safe_dump(data)


def m_no_rollout_resource(docs):
    del _group(docs, "RayJob", "rollout").spec["rayStartParams"]["resources"]


def m_gpu_request_without_limit(docs):
    res = _group(docs, "RayJob", "gpu").ray_container["resources"]
    del res["limits"]["nvidia.com/gpu"]


def m_learner_without_gpu(docs):
    g = _group(docs, "RayJob", "gpu")
    for kind in ("requests", "limits"):
        del g.ray_container["resources"][kind]["nvidia.com/gpu"]
    del g.spec["rayStartParams"]["num-gpus"]


def m_serve_more_gpus_than_cluster(docs):
    rs = _find(docs, "RayService")
    rs["spec"]["serveConfigV2"] = rs["spec"]["serveConfigV2"].replace("max_replicas: 4", "max_replicas: 9")


def m_checkpoints_on_emptydir(docs):
    pod = _group(docs, "RayJob", "head").pod
    for vol in pod["volumes"]:
        if vol["name"] == "checkpoints":
            vol.pop("persistentVolumeClaim")
            vol["emptyDir"] = {}


def m_ray_version_drift(docs):
    _find(docs, "RayCluster")["spec"]["rayVersion"] = "2.59.0"


def m_image_tag_drift(docs):
    c = _group(docs, "RayJob", "rollout").ray_container
    c["image"] = c["image"].replace("ray2.60.0", "ray2.59.0")


def m_redis_latest(docs):
    _find(docs, "StatefulSet", "proxmo-redis")["spec"]["template"]["spec"]["containers"][0]["image"] = "redis:latest"


def m_no_memory_limit(docs):
    c = _find(docs, "StatefulSet", "proxmo-redis")["spec"]["template"]["spec"]["containers"][0]
    del c["resources"]["limits"]["memory"]


def m_request_over_limit(docs):
    _group(docs, "RayJob", "rollout").ray_container["resources"]["requests"]["cpu"] = "16"


def m_privilege_escalation(docs):
    _group(docs, "RayCluster", "rollout").ray_container["securityContext"]["allowPrivilegeEscalation"] = True


def m_loadbalancer(docs):
    _find(docs, "Service", "proxmo-train-dashboard")["spec"]["type"] = "LoadBalancer"


def m_head_nodeport(docs):
    _find(docs, "RayCluster")["spec"]["headGroupSpec"]["serviceType"] = "NodePort"


def m_literal_requirepass(docs):
    c = _find(docs, "StatefulSet", "proxmo-redis")["spec"]["template"]["spec"]["containers"][0]
    c["args"] = ["exec redis-server --requirepass hunter2 --appendonly yes --dir /data"]


def m_literal_redis_url(docs):
    env = _group(docs, "RayJob", "rollout").ray_container["env"]
    next(e for e in env if e["name"] == "REDIS_URL")["value"] = "redis://:hunter2@proxmo-redis:6379/0"


def m_aof_off(docs):
    c = _find(docs, "StatefulSet", "proxmo-redis")["spec"]["template"]["spec"]["containers"][0]
    c["args"] = [c["args"][0].replace("--appendonly yes", "--appendonly no")]


def m_committed_secret(docs):
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "proxmo-redis"},
                 "stringData": {"password": "hunter2"}})


def m_gcs_on_buffer_redis(docs):
    ft = _find(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    ft["redisAddress"] = "proxmo-redis:6379"


def m_gcs_literal_password(docs):
    ft = _find(docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    ft["redisPassword"] = {"value": "hunter2"}


def m_no_networkpolicy(docs):
    docs.remove(_find(docs, "NetworkPolicy", "proxmo-redis-ingress"))


def m_networkpolicy_ipblock(docs):
    np = _find(docs, "NetworkPolicy", "proxmo-redis-ingress")
    np["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})


def m_ray_pod_not_allowed(docs):
    labels = _group(docs, "RayJob", "rollout").spec["template"]["metadata"]["labels"]
    del labels["proxmo.io/redis-client"]


def m_service_selector_typo(docs):
    _find(docs, "Service", "proxmo-train-dashboard")["spec"]["selector"]["proxmo.io/app"] = "trian"


PLANTED = [
    ("replicas", "minReplicas 40 > maxReplicas", m_min_gt_max),
    ("submission", "submissionMode 'K8sMode'", m_bad_submission_mode),
    ("submission", "shutdownAfterJobFinishes", m_no_shutdown),
    ("autoscaling", "enableInTreeAutoscaling", m_no_autoscaling),
    ("operator", "not a JSON object string", m_bad_resources_string),
    ("operator", "REDIS_PASSWORD conflicts", m_gcs_env_conflict),
    ("operator", "expects 'gcs-server'", m_head_port_name),
    ("config", "unknown key(s) ['learner_typo']", m_config_unknown_key),
    ("config", "ray.address is empty", m_config_local_ray),
    ("custom-resources", "resource rollout=1 but no worker group", m_no_rollout_resource),
    ("gpu", "in requests but not in limits", m_gpu_request_without_limit),
    ("gpu", "learner needs 1 GPU", m_learner_without_gpu),
    ("gpu", "needs 9 GPUs at once", m_serve_more_gpus_than_cluster),
    ("checkpoints", "not on a PersistentVolumeClaim", m_checkpoints_on_emptydir),
    ("image-version", "rayVersion '2.59.0'", m_ray_version_drift),
    ("image-version", "image tag '0.1.0-ray2.59.0-cu128'", m_image_tag_drift),
    ("image-version", "needs a fixed tag", m_redis_latest),
    ("resources", "no limits.memory", m_no_memory_limit),
    ("resources", "requests.cpu 16 > limits.cpu", m_request_over_limit),
    ("security-context", "allowPrivilegeEscalation", m_privilege_escalation),
    ("exposure", "LoadBalancer exposes it", m_loadbalancer),
    ("exposure", "serviceType NodePort", m_head_nodeport),
    ("redis-auth", "not a literal", m_literal_requirepass),
    ("redis-auth", "never a literal password", m_literal_redis_url),
    ("redis-auth", "AOF off", m_aof_off),
    ("redis-auth", "Secret with data is committed", m_committed_secret),
    ("redis-separation", "uses the trajectory-buffer Redis", m_gcs_on_buffer_redis),
    ("redis-separation", "valueFrom.secretKeyRef", m_gcs_literal_password),
    ("networkpolicy", "no NetworkPolicy selects", m_no_networkpolicy),
    ("networkpolicy", "peers must be labelled pod selectors", m_networkpolicy_ipblock),
    ("networkpolicy", "not allowed by the policy", m_ray_pod_not_allowed),
    ("service-selectors", "matches no pod template", m_service_selector_typo),
]


@pytest.mark.parametrize("rule,expected,mutate", PLANTED, ids=[f"{r}-{m.__name__[2:]}" for r, _, m in PLANTED])
def test_planted_error_is_caught(rendered, ctx, rule, expected, mutate):
    docs = copy.deepcopy(rendered["gpu"])
    assert _failures(docs, ctx, rule) == []
    mutate(docs)
    errors = _failures(docs, ctx, rule)
    assert any(expected in e for e in errors), errors


def test_every_rule_has_a_planted_error():
    from services.k8s_validate.rules import RULES

    assert {name for name, _ in RULES} <= {rule for rule, _, _ in PLANTED}


def test_exposure_opt_in_is_honoured(rendered, ctx):
    docs = copy.deepcopy(rendered["gpu"])
    m_loadbalancer(docs)
    svc = _find(docs, "Service", "proxmo-train-dashboard")
    svc["metadata"].setdefault("annotations", {})["proxmo.io/expose-outside-cluster"] = "true"
    assert _failures(docs, ctx, "exposure") == []


def test_cpu_overlay_learner_needs_no_gpu_but_gpu_config_does(rendered, ctx):
    docs = copy.deepcopy(rendered["cpu-dev"])
    assert _failures(docs, ctx, "gpu") == []
    cm = _find(docs, "ConfigMap", "proxmo-config")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("num_gpus: 0\n", "num_gpus: 1\n")
    assert any("needs 1 GPU" in e for e in _failures(docs, ctx, "gpu"))


def test_malformed_object_is_a_failed_check_not_a_crash(rendered, ctx):
    docs = copy.deepcopy(rendered["gpu"])
    _find(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"] = "oops"
    assert any(not c.ok for c in run_rules(docs, ctx))
