"""Schema checks: KubeRay CRDs, built-in kinds, and Ray Serve's serveConfigV2.

Why three validators: no API server runs here, so each layer that an apply would
hit is reproduced offline with the same schema it would use.

* KubeRay custom resources: the CRD's ``openAPIV3Schema`` (copied unchanged into
  ``crds/``), turned into JSON Schema. Kubernetes extensions are mapped as the API
  server treats them: ``x-kubernetes-int-or-string`` accepts an integer or a string,
  ``nullable`` adds null, ``x-kubernetes-preserve-unknown-fields`` keeps an object
  open, every other object is closed (an unknown field is an error, as with
  ``kubectl apply --validate=strict``), and ``x-kubernetes-list-type: map|set``
  lists must not repeat a key. CEL rules (``x-kubernetes-validations``) are not
  evaluated; the ones that matter for us are re-implemented in ``rules.py``.
* Built-in kinds: PyPI ``kubernetes-validate`` (bundled schemas, strict mode, offline).
* ``serveConfigV2``: Ray's own ``ServeDeploySchema``. That pydantic model ignores
  unknown keys and keeps ``autoscaling_config`` as a plain dict, so unknown keys are
  checked against the model fields and autoscaling against ``AutoscalingConfig``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).with_name("crds")
K8S_VERSION = "1.30"  # oldest Kubernetes minor we promise to apply on
_COPY_KEYS = (
    "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "required", "uniqueItems", "multipleOf",
)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _convert(node: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI v3 (structural) schema node -> JSON Schema."""
    out: dict[str, Any] = {k: node[k] for k in _COPY_KEYS if k in node}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "type" in node:
        out["type"] = [node["type"], "null"] if node.get("nullable") else node["type"]
    if "properties" in node:
        out["properties"] = {k: _convert(v) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"])
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = _convert(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out.setdefault("allOf", []).append({key: [_convert(n) for n in node[key]]})
    list_type = node.get("x-kubernetes-list-type")
    if list_type in ("map", "set"):
        out["x-k8s-unique"] = node.get("x-kubernetes-list-map-keys", []) if list_type == "map" else []
    return out


def _unique_keyword(validator, keys, instance, schema):
    """``x-kubernetes-list-type: map`` (unique by its keys) or ``set`` (unique items)."""
    if not isinstance(instance, list):
        return
    seen: set[str] = set()
    for item in instance:
        if keys and isinstance(item, dict):
            ident = repr([item.get(k) for k in keys])
            what = "key " + ", ".join(f"{k}={item.get(k)!r}" for k in keys)
        else:
            ident = what = f"item {item!r}"
        if ident in seen:
            yield jsonschema.ValidationError(f"duplicate {what} in a list that must be unique")
        seen.add(ident)


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-k8s-unique": _unique_keyword}
)


@functools.lru_cache(maxsize=1)
def crd_validators() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> validator, for every version served by the bundled CRDs."""
    table: dict[tuple[str, str], Any] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            root = dict(version["schema"]["openAPIV3Schema"])
            props = dict(root.get("properties", {}))
            # metadata is validated by the API server's ObjectMeta rules (rules.py: names).
            props["metadata"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            props.pop("status", None)  # written by the operator, never by us
            root["properties"] = props
            table[(f"{group}/{version['name']}", kind)] = _K8sValidator(_convert(root))
    return table


def _path(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def validate_custom(doc: dict[str, Any]) -> list[str]:
    """Errors of one KubeRay custom resource against its CRD schema ([] when valid)."""
    validator = crd_validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no CRD bundled for {doc.get('apiVersion')} {doc.get('kind')}"]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{_path(e)}: {e.message}" for e in errors[:10]]


def is_custom(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith("ray.io/")


def validate_builtin(doc: dict[str, Any]) -> list[str]:
    """Errors of a built-in kind from kubernetes-validate's bundled strict schemas."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_path(exc)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def validate_doc(doc: dict[str, Any]) -> list[str]:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (apiVersion and kind are required)"]
    return validate_custom(doc) if is_custom(doc) else validate_builtin(doc)


# --------------------------------------------------------------------------- serveConfigV2


def _model_fields(model: Any) -> set[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__fields__", {})
    return set(fields)


def _unknown(data: Any, model: Any, where: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    extra = sorted(set(data) - _model_fields(model))
    return [f"{where}: unknown key(s) {extra}"] if extra else []


def validate_serve_config(text: str) -> list[str]:
    """Errors of a RayService ``serveConfigV2`` string under Ray's own schema."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"serveConfigV2 is not YAML: {exc}"]
    if not isinstance(data, dict):
        return ["serveConfigV2 must be a mapping with `applications`"]
    try:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema
    except ImportError as exc:  # ray is a declared dependency; say so instead of skipping
        return [f"cannot import ray.serve.schema to validate serveConfigV2: {exc}"]
    errors = _unknown(data, ServeDeploySchema, "serveConfigV2")
    try:
        ServeDeploySchema.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError; message lists every field
        errors.append(f"serveConfigV2: {exc}")
    for i, app in enumerate(data.get("applications") or []):
        errors += _unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate((app or {}).get("deployments") or [] if isinstance(app, dict) else []):
            where = f"applications[{i}].deployments[{j}]"
            errors += _unknown(dep, DeploymentSchema, where)
            auto = dep.get("autoscaling_config") if isinstance(dep, dict) else None
            if isinstance(auto, dict):
                errors += _unknown(auto, AutoscalingConfig, f"{where}.autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(auto)
                except Exception as exc:
                    errors.append(f"{where}.autoscaling_config: {exc}")
    return errors


def load_serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    """The parsed serveConfigV2 of a RayService ({} when absent or unparsable)."""
    try:
        data = yaml.safe_load(doc.get("spec", {}).get("serveConfigV2") or "")
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
