"""The offline k8s validator end to end: schemas, renderers, Dockerfiles, the CLI.

Rule-by-rule planted errors are in test_k8s_rules.py; this file checks the layers
around them, and that `make k8s-validate` passes on the repository and fails (with
its `N passed, M failed` line) when an error is planted in a file.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from services.k8s_validate import dockerfile, kustomize, main, read_pins, schemas
from services.k8s_validate.objects import quantity

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/cpu-dev", "k8s/overlays/gpu"]


@pytest.fixture(scope="module")
def gpu_docs():
    return kustomize.render_builtin(ROOT / "k8s" / "overlays" / "gpu")


def _find(docs, kind):
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind))


# --------------------------------------------------------------------------- schemas


def test_every_rendered_object_passes_its_schema(gpu_docs):
    assert {d["kind"] for d in gpu_docs} >= {"RayJob", "RayService", "RayCluster", "StatefulSet", "NetworkPolicy"}
    assert {f"{d['kind']}/{d['metadata']['name']}": schemas.validate_doc(d) for d in gpu_docs} == \
        {f"{d['kind']}/{d['metadata']['name']}": [] for d in gpu_docs}


def test_crd_schema_rejects_unknown_fields_and_wrong_types(gpu_docs):
    job = _find(gpu_docs, "RayJob")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["replicas"] = 1  # not a head field
    assert any("replicas" in e and "unexpected" in e for e in schemas.validate_doc(job))
    job = _find(gpu_docs, "RayJob")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 8  # must be a string
    assert any("rayStartParams.num-cpus" in e for e in schemas.validate_doc(job))
    job = _find(gpu_docs, "RayJob")
    job["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"  # enum
    assert any("upscalingMode" in e for e in schemas.validate_doc(job))


def test_crd_schema_int_or_string_and_list_map_keys(gpu_docs):
    job = _find(gpu_docs, "RayJob")
    res = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"] = 8  # int-or-string: an integer is fine
    res["requests"]["cpu"] = "7500m"
    assert schemas.validate_doc(job) == []
    res["limits"]["cpu"] = True
    assert schemas.validate_doc(job) != []
    job = _find(gpu_docs, "RayJob")
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    pod["containers"][0]["ports"] = [{"containerPort": 80}, {"containerPort": 80}]  # list-map key repeated
    assert any("duplicate" in e for e in schemas.validate_doc(job))


def test_builtin_kind_schema_is_strict(gpu_docs):
    svc = _find(gpu_docs, "Service")
    svc["spec"]["bogus"] = 1
    assert any("bogus" in e for e in schemas.validate_doc(svc))
    assert schemas.validate_doc({"kind": "Service"}) != []
    assert any("Couldn't find schema" in e for e in schemas.validate_doc({"apiVersion": "x.io/v1", "kind": "Nope"}))


def test_serve_config_uses_rays_schema(gpu_docs):
    text = _find(gpu_docs, "RayService")["spec"]["serveConfigV2"]
    assert schemas.validate_serve_config(text) == []
    assert any("import path" in e for e in schemas.validate_serve_config(
        text.replace("services.serving.app:app_builder", "app_builder")))
    assert any("unknown key(s) ['max_replica']" in e for e in schemas.validate_serve_config(
        text.replace("max_replicas: 4", "max_replica: 4")))
    assert any("must be greater than or equal to min_replicas" in e for e in schemas.validate_serve_config(
        text.replace("max_replicas: 4", "max_replicas: 1")))
    assert any("unknown key(s) ['bogus']" in e for e in schemas.validate_serve_config(
        text.replace("route_prefix: /", "route_prefix: /\n    bogus: 1")))
    assert schemas.validate_serve_config("applications: [") != []


# --------------------------------------------------------------------------- rendering


def test_training_configs_in_the_manifests_load():
    """Example configs are validated too: each generator input loads through load_config."""
    from services.config import load_config

    configs = sorted((ROOT / "k8s").rglob("config.yaml"))
    assert len(configs) == 2
    for path in configs:
        cfg = load_config(path)
        assert cfg.ray.address == "auto" and cfg.rollout.resources == {"rollout": 1}


@pytest.mark.skipif(kustomize.kubectl_available() is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_builtin_renderer_matches_kubectl_kustomize(directory):
    assert kustomize.diff(kustomize.render_builtin(ROOT / directory), kustomize.render_kubectl(ROOT / directory)) == []


def test_builtin_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(kustomize.RenderError, match="commonLabels"):
        kustomize.render_builtin(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches:\n- path: p.yaml\n")
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: [1]}\n")
    with pytest.raises(kustomize.RenderError, match="lists"):
        kustomize.render_builtin(tmp_path)


def test_json6902_operations():
    doc = {"metadata": {"labels": {"a/b": "1"}}, "spec": {"items": [1, 2]}}
    kustomize._json6902(doc, [
        {"op": "test", "path": "/metadata/labels/a~1b", "value": "1"},
        {"op": "replace", "path": "/metadata/labels/a~1b", "value": "2"},
        {"op": "add", "path": "/spec/items/-", "value": 3},
        {"op": "add", "path": "/spec/items/0", "value": 0},
        {"op": "remove", "path": "/spec/items/1"},
    ])
    assert doc == {"metadata": {"labels": {"a/b": "2"}}, "spec": {"items": [0, 2, 3]}}
    with pytest.raises(kustomize.RenderError, match="does not exist"):
        kustomize._json6902(doc, [{"op": "replace", "path": "/spec/missing", "value": 1}])
    with pytest.raises(kustomize.RenderError, match="test failed"):
        kustomize._json6902(doc, [{"op": "test", "path": "/spec/items/0", "value": 9}])


def test_quantities():
    assert quantity("500m") == 0.5 and quantity("8Gi") == 8 * 2**30 and quantity(2) == 2.0
    assert quantity("1e3") == 1000.0 and quantity("1.5k") == 1500.0
    for bad in ("8GB", "", "lots", True):
        with pytest.raises(ValueError):
            quantity(bad)


# --------------------------------------------------------------------------- images


def test_ray_pin_is_read_from_pyproject():
    ctx = read_pins(ROOT)
    assert ctx.ray_version == "2.60.0"
    assert ctx.tag_pattern.match("0.1.0-ray2.60.0-cu128") and not ctx.tag_pattern.match("0.1.0-ray2.59.0-cpu")


def test_dockerfiles_pass_and_planted_errors_are_caught(tmp_path):
    for name, gpu in (("Dockerfile", True), ("Dockerfile.cpu", False)):
        text = (ROOT / "deploy" / name).read_text()
        assert dockerfile.check_dockerfile(ROOT / "deploy" / name, "2.60.0", gpu) == []
        planted = {
            "numeric non-zero uid": text.replace("USER 1000:1000", "USER root"),
            "no USER": text.replace("USER 1000:1000", ""),
            "pyproject.toml pins ray==2.60.0": text.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"),
            "does not install wget": text.replace(" wget ", " "),
            "fixed tag": text.replace(":12.8.1-runtime-ubuntu24.04", ":latest").replace(":3.11-slim-bookworm", ""),
        }
        for expected, broken in planted.items():
            path = tmp_path / name
            path.write_text(broken)
            assert any(expected in e for e in dockerfile.check_dockerfile(path, "2.60.0", gpu)), (name, expected)
    assert dockerfile.cuda_variant(ROOT / "deploy" / "Dockerfile") == "cu128"


# --------------------------------------------------------------------------- CLI


def _copy_repo(dst: Path) -> Path:
    shutil.copytree(ROOT / "k8s", dst / "k8s")
    shutil.copytree(ROOT / "deploy", dst / "deploy", ignore=shutil.ignore_patterns("configs", "grafana"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst / "k8s"


def _summary(out: str) -> tuple[int, int]:
    last = out.strip().splitlines()[-1].split()
    assert last[1] == "passed," and last[3] == "failed", out[-500:]
    return int(last[0]), int(last[2])


def test_cli_passes_on_the_repository(capsys):
    assert main([str(ROOT / "k8s"), "-q"]) == 0
    passed, failed = _summary(capsys.readouterr().out)
    assert failed == 0 and passed > 100


def test_cli_fails_on_planted_file_errors_with_the_builtin_renderer(tmp_path, capsys):
    k8s = _copy_repo(tmp_path)
    job = k8s / "base" / "rayjob-train.yaml"
    job.write_text(job.read_text().replace("minReplicas: 1\n        maxReplicas: 8", "minReplicas: 9\n        maxReplicas: 8"))
    pvc = k8s / "base" / "checkpoints-pvc.yaml"
    pvc.write_text(pvc.read_text().replace("storage: 100Gi", "storage: 100Gi\n  unknownField: 1"))
    (k8s / "stray.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                                                     "spec": {"type": "NodePort", "ports": [{"port": 80}]}}))
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("ray[default,serve]==2.60.0", "ray[default,serve]==2.61.0"))
    assert main([str(k8s), "--renderer", "builtin"]) == 1
    out = capsys.readouterr().out
    _, failed = _summary(out)
    assert failed >= 5
    assert "minReplicas 9 > maxReplicas 8" in out and "unknownField" in out
    assert "FAIL  exposure          k8s/stray.yaml: Service/x" in out
    assert "rayVersion '2.60.0' != ray pinned in pyproject.toml (2.61.0)" in out
    assert "ARG RAY_VERSION=2.60.0 but pyproject.toml pins ray==2.61.0" in out


def test_vendored_crds_are_the_shared_ones_unchanged():
    shared = ROOT.parent / "shared" / "kuberay-crds-v1.7.0"
    if not shared.is_dir():
        pytest.skip("../shared/kuberay-crds-v1.7.0 not beside the repository")
    for path in sorted(shared.iterdir()):
        assert (schemas.CRD_DIR / path.name).read_bytes() == path.read_bytes(), path.name


def test_grafana_dashboard_queries_metrics_the_driver_exports():
    """Each ray_proxmo_* series in the dashboard is a key the driver logs (services.metrics naming)."""
    import json
    import re

    from services.metrics import metric_name

    dash = json.loads((ROOT / "deploy" / "grafana" / "proxmo-training.json").read_text())
    driver = (ROOT / "services" / "driver.py").read_text()
    exported = {"ray_" + metric_name(k) for k in re.findall(r'"([a-z_]+/[a-z_]+)"', driver)}
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_proxmo_\w+", t["expr"])}
    assert used and used <= exported, used - exported
