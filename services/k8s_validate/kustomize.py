"""Render kustomize directories: with ``kubectl kustomize`` when it is installed, else
with a small built-in renderer.

The built-in renderer exists so that validation also runs on a machine without
kubectl (CI images, laptops). It implements only the subset of kustomize that
``k8s/`` uses, and refuses anything else with a clear error instead of guessing:

* ``resources`` (files and directories), ``namespace``,
* ``labels`` with ``pairs`` (metadata labels only: no selectors, no templates),
* ``images`` (``newName`` / ``newTag`` / ``digest`` on every ``containers`` and
  ``initContainers`` entry, in any kind, as kustomize does for custom resources),
* ``configMapGenerator`` (``files``, ``literals``, ``options.labels/annotations``;
  ``behavior`` create/replace/merge)
  with ``generatorOptions.disableNameSuffixHash: true``,
* ``patches`` given as JSON6902 operations (add, remove, replace, test) selected by
  ``target`` kind/name, or strategic-merge patches without lists.

When both are available the validator renders with both and checks they agree,
so the built-in renderer is itself tested against kustomize on every run.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
_SUPPORTED = {
    "apiVersion", "kind", "resources", "namespace", "labels", "images",
    "configMapGenerator", "generatorOptions", "patches",
}
_CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
}


class RenderError(RuntimeError):
    """A kustomization cannot be rendered (bad file, or a feature we do not implement)."""


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def load_yaml_docs(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise RenderError(f"{path}: not valid YAML: {exc}") from exc


def kubectl_available() -> str | None:
    return shutil.which("kubectl")


def render_kubectl(directory: Path) -> list[dict[str, Any]]:
    kubectl = kubectl_available()
    if kubectl is None:
        raise RenderError("kubectl is not installed")
    proc = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


# --------------------------------------------------------------------------- built-in


def _kustomization(directory: Path) -> dict[str, Any]:
    path = kustomization_file(directory)
    if path is None:
        raise RenderError(f"{directory}: no kustomization.yaml")
    docs = load_yaml_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RenderError(f"{path}: must hold one mapping")
    unsupported = sorted(set(docs[0]) - _SUPPORTED)
    if unsupported:
        raise RenderError(f"{path}: the built-in renderer does not implement {unsupported}; install kubectl")
    return docs[0]


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return (str(doc.get("kind")), str(meta.get("namespace", "")), str(meta.get("name")))


def _generate_configmaps(directory: Path, kz: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    gens = kz.get("configMapGenerator") or []
    if gens and not (kz.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise RenderError(f"{directory}: built-in renderer needs generatorOptions.disableNameSuffixHash: true")
    for gen in gens:
        data: dict[str, str] = {}
        for item in gen.get("files") or []:
            key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
            data[key] = (directory / rel).read_text()
        for item in gen.get("literals") or []:
            key, _, value = item.partition("=")
            data[key] = value
        name, behavior = gen["name"], gen.get("behavior", "create")
        existing = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == name]
        if behavior == "create":
            if existing:
                raise RenderError(f"{directory}: configMapGenerator {name} already exists (use behavior: replace)")
            meta: dict[str, Any] = {"name": name}
            for key in ("labels", "annotations"):
                if (gen.get("options") or {}).get(key):
                    meta[key] = dict(gen["options"][key])
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
        elif behavior in ("replace", "merge"):
            if not existing:
                raise RenderError(f"{directory}: configMapGenerator {name}: nothing to {behavior}")
            target = existing[0]
            target["data"] = data if behavior == "replace" else {**(target.get("data") or {}), **data}
        else:
            raise RenderError(f"{directory}: configMapGenerator {name}: unknown behavior {behavior!r}")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise RenderError(f"JSON patch path {path!r} does not exist")
    return node


def _json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _pointer(path)
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if kind == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise RenderError(f"JSON patch test failed at {path}")
        elif kind in ("add", "replace"):
            value = copy.deepcopy(op.get("value"))
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, value)
                else:
                    parent[idx] = value
            else:
                if kind == "replace" and last not in parent:
                    raise RenderError(f"JSON patch replace: {path} does not exist")
                parent[last] = value
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            elif last in parent:
                del parent[last]
            else:
                raise RenderError(f"JSON patch remove: {path} does not exist")
        else:
            raise RenderError(f"JSON patch op {kind!r} is not implemented by the built-in renderer")


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, list):
            raise RenderError("built-in renderer: strategic-merge patches with lists are not implemented; use JSON6902")
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    checks = {"kind": doc.get("kind"), "name": (doc.get("metadata") or {}).get("name"),
              "group": group, "version": version}
    unknown = sorted(set(target) - set(checks) - {"namespace"})
    if unknown:
        raise RenderError(f"built-in renderer: patch target field(s) {unknown} not implemented")
    return all(checks[k] == v for k, v in target.items() if k in checks)


def _apply_patches(directory: Path, kz: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    for entry in kz.get("patches") or []:
        if "path" in entry:
            body = load_yaml_docs(directory / entry["path"])
            body = body[0] if len(body) == 1 else body
        else:
            body = yaml.safe_load(entry.get("patch", ""))
        target = entry.get("target")
        if target is None:
            if not isinstance(body, dict):
                raise RenderError(f"{directory}: a JSON6902 patch needs a target")
            target = {"kind": body.get("kind"), "name": (body.get("metadata") or {}).get("name")}
        hits = [d for d in docs if _matches(d, target)]
        if not hits:
            raise RenderError(f"{directory}: patch target {target} matches nothing")
        for doc in hits:
            if isinstance(body, list):
                _json6902(doc, body)
            else:
                _merge(doc, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")})


def _set_image(image: str, rule: dict[str, Any]) -> str:
    name, digest = (image.split("@", 1) + [""])[:2]
    repo, tag = name, ""
    if ":" in name.rsplit("/", 1)[-1]:
        repo, tag = name.rsplit(":", 1)
    if repo != rule["name"]:
        return image
    repo = rule.get("newName", repo)
    if rule.get("digest"):
        return f"{repo}@{rule['digest']}"
    tag = rule.get("newTag", tag)
    out = f"{repo}:{tag}" if tag else repo
    return f"{out}@{digest}" if digest and "newTag" not in rule else out


def _images(node: Any, rules: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        for rule in rules:
                            c["image"] = _set_image(c["image"], rule)
            _images(value, rules)
    elif isinstance(node, list):
        for item in node:
            _images(item, rules)


def render_builtin(directory: Path) -> list[dict[str, Any]]:
    directory = Path(directory)
    kz = _kustomization(directory)
    docs: list[dict[str, Any]] = []
    for res in kz.get("resources") or []:
        path = directory / res
        if path.is_dir():
            docs += render_builtin(path)
        elif path.is_file():
            docs += [d for d in load_yaml_docs(path)]
        else:
            raise RenderError(f"{directory}: resource {res} does not exist")
    _generate_configmaps(directory, kz, docs)
    _apply_patches(directory, kz, docs)
    ns = kz.get("namespace")
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if ns and doc.get("kind") not in _CLUSTER_SCOPED:
            meta["namespace"] = ns
        for entry in kz.get("labels") or []:
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                raise RenderError(f"{directory}: labels with includeSelectors/includeTemplates not implemented")
            meta.setdefault("labels", {}).update(entry.get("pairs") or {})
    _images(docs, kz.get("images") or [])
    seen: set[tuple[str, str, str]] = set()
    for doc in docs:
        if _key(doc) in seen:
            raise RenderError(f"{directory}: duplicate object {_key(doc)}")
        seen.add(_key(doc))
    return docs


def canonical(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Order-free form of a rendering, to compare two renderers."""
    return {_key(d): json.dumps(d, sort_keys=True) for d in docs}


def diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    ca, cb = canonical(a), canonical(b)
    out = [f"only in first: {k}" for k in sorted(set(ca) - set(cb))]
    out += [f"only in second: {k}" for k in sorted(set(cb) - set(ca))]
    out += [f"differs: {k}" for k in sorted(set(ca) & set(cb)) if ca[k] != cb[k]]
    return out


def render(directory: Path, renderer: str = "auto") -> tuple[list[dict[str, Any]], str]:
    """Render ``directory``; returns (documents, name of the renderer used)."""
    if renderer == "kubectl" or (renderer == "auto" and kubectl_available()):
        return render_kubectl(directory), "kubectl"
    if renderer in ("builtin", "auto"):
        return render_builtin(directory), "builtin"
    raise ValueError(f"renderer must be auto|kubectl|builtin, got {renderer!r}")


def referenced_files(directory: Path) -> dict[Path, str]:
    """Files a kustomization uses, with their role (resource, patch, generator input)."""
    kz = _kustomization(directory)
    roles: dict[Path, str] = {}
    for res in kz.get("resources") or []:
        if (directory / res).is_file():
            roles[(directory / res).resolve()] = "resource"
    for entry in kz.get("patches") or []:
        if "path" in entry:
            roles[(directory / entry["path"]).resolve()] = "patch"
    for gen in kz.get("configMapGenerator") or []:
        for item in gen.get("files") or []:
            roles[(directory / item.partition("=")[2 if "=" in item else 0]).resolve()] = "generator input"
    return roles
