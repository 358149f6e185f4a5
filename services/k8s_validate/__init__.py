"""Offline validation of the Kubernetes deployment (``make k8s-validate``).

No API server, KubeRay operator or Docker engine runs in CI, so this reproduces
what each would reject, as far as that can be done from files:

1. every kustomization under the given folder is rendered (``kubectl kustomize``
   when installed, else the built-in subset renderer; with both, they must agree);
2. every rendered object is checked against its schema (KubeRay CRDs, built-in
   kinds, Ray Serve's schema for ``serveConfigV2``), see ``schemas.py``;
3. the run-time and project rules of ``rules.py`` run on each rendering;
4. YAML files that no kustomization uses are validated on their own;
5. the Dockerfiles in ``deploy/`` are checked statically (``dockerfile.py``), and
   every image tag the manifests use must be one that a Dockerfile builds.

Usage: ``python -m services.k8s_validate k8s [--renderer auto|kubectl|builtin] [-q]``.
The last line printed is ``N passed, M failed``; the exit code is 1 on any failure.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from . import dockerfile, kustomize, schemas
from .rules import Check, Context, run_rules

__all__ = ["Check", "Context", "read_pins", "validate_rendering", "validate_tree", "main"]


def read_pins(repo_root: Path) -> Context:
    """Ray and project versions from pyproject.toml (the single source of both)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    data = tomllib.loads((repo_root / "pyproject.toml").read_text())
    project = data.get("project", {})
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    pins = {m.group(1) for d in deps if (m := re.match(r"^ray(?:\[[^\]]*\])?==([\w.]+)$", d.replace(" ", "")))}
    if len(pins) != 1:
        raise ValueError(f"pyproject.toml must pin ray exactly once (ray[...]==X), found {sorted(pins) or 'none'}")
    return Context(ray_version=pins.pop(), project_version=str(project.get("version", "")))


def _label(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def validate_rendering(docs: list[dict[str, Any]], ctx: Context, where: str) -> list[Check]:
    """Schema checks of every object plus all rules, for one rendered set."""
    out: list[Check] = []
    for doc in docs:
        target = f"{where}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        out.append(Check("schema", target, tuple(schemas.validate_doc(doc))))
        if doc.get("kind") == "RayService":
            errors = schemas.validate_serve_config(str((doc.get("spec") or {}).get("serveConfigV2", "")))
            out.append(Check("serve-config", target, tuple(errors)))
    for check in run_rules(docs, ctx):
        out.append(Check(check.rule, f"{where}: {check.target}", check.errors))
    return out


def _render_checks(directory: Path, root: Path, renderer: str) -> tuple[list[dict[str, Any]] | None, list[Check]]:
    where = _label(directory, root)
    try:
        docs, used = kustomize.render(directory, renderer)
    except (kustomize.RenderError, OSError, KeyError, TypeError) as exc:
        return None, [Check("render", where, (str(exc),))]
    checks = [Check("render", f"{where} ({used})")]
    if used == "kubectl":
        try:
            errors = kustomize.diff(docs, kustomize.render_builtin(directory))
        except (kustomize.RenderError, OSError, KeyError, TypeError) as exc:
            errors = [f"built-in renderer failed: {exc}"]
        checks.append(Check("render-agreement", f"{where} (built-in == kubectl)", tuple(errors)))
    return docs, checks


def _image_builds(tags: set[str], repo_root: Path) -> list[Check]:
    """Each tag variant the manifests use is built by a Dockerfile in deploy/."""
    out = []
    gpu_file, cpu_file = repo_root / "deploy" / "Dockerfile", repo_root / "deploy" / "Dockerfile.cpu"
    for tag in sorted(tags):
        variant = tag.rsplit("-", 1)[-1]
        errors = []
        if variant == "cpu" and not cpu_file.is_file():
            errors.append("no deploy/Dockerfile.cpu builds the -cpu variant")
        elif variant.startswith("cu"):
            built = dockerfile.cuda_variant(gpu_file) if gpu_file.is_file() else None
            if built != variant:
                errors.append(f"deploy/Dockerfile builds {built or 'no CUDA variant'}, manifests use {variant}")
        out.append(Check("image-build", f"tag {tag}", tuple(errors)))
    return out


def validate_tree(k8s_dir: Path, renderer: str = "auto", repo_root: Path | None = None) -> list[Check]:
    """All checks for a manifests folder; see the module docstring for the steps."""
    k8s_dir = Path(k8s_dir).resolve()
    repo_root = Path(repo_root).resolve() if repo_root else k8s_dir.parent
    checks: list[Check] = []
    try:
        ctx = read_pins(repo_root)
        checks.append(Check("version-pin", f"pyproject.toml ray=={ctx.ray_version}"))
    except (OSError, ValueError) as exc:
        checks.append(Check("version-pin", "pyproject.toml", (str(exc),)))
        ctx = Context(ray_version="<unknown>", project_version="<unknown>")
    if not k8s_dir.is_dir():
        return checks + [Check("render", str(k8s_dir), ("not a directory",))]
    used: dict[Path, str] = {}
    tags: set[str] = set()
    dirs = sorted({p.parent for name in kustomize.KUSTOMIZATION_NAMES for p in k8s_dir.rglob(name)})
    for directory in dirs:
        try:
            used.update(kustomize.referenced_files(directory))
        except kustomize.RenderError:
            pass  # reported by rendering below
        for name in kustomize.KUSTOMIZATION_NAMES:
            used[(directory / name).resolve()] = "kustomization"
        docs, render_checks = _render_checks(directory, k8s_dir, renderer)
        checks += render_checks
        if docs is not None:
            checks += validate_rendering(docs, ctx, _label(directory, k8s_dir))
            tags |= _ray_tags(docs)
    for path in sorted(list(k8s_dir.rglob("*.yaml")) + list(k8s_dir.rglob("*.yml"))):
        if path.resolve() in used:
            continue
        try:
            docs = kustomize.load_yaml_docs(path)
        except kustomize.RenderError as exc:
            checks.append(Check("render", _label(path, k8s_dir), (str(exc),)))
            continue
        checks += validate_rendering(docs, ctx, _label(path, k8s_dir))
        tags |= _ray_tags(docs)
    for name, gpu in (("Dockerfile", True), ("Dockerfile.cpu", False)):
        path = repo_root / "deploy" / name
        if path.is_file():
            checks.append(Check("dockerfile", f"deploy/{name}", tuple(dockerfile.check_dockerfile(path, ctx.ray_version, gpu))))
    checks += _image_builds(tags, repo_root)
    return checks


def _ray_tags(docs: list[dict[str, Any]]) -> set[str]:
    from .objects import RAY_KINDS, groups

    return {str(g.ray_container.get("image", "")).rpartition(":")[2]
            for d in docs if d.get("kind") in RAY_KINDS for g in groups(d)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.k8s_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default="k8s", help="manifests folder (default: k8s)")
    parser.add_argument("--renderer", choices=("auto", "kubectl", "builtin"), default="auto")
    parser.add_argument("--repo-root", default=None, help="folder with pyproject.toml and deploy/ (default: PATH/..)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    args = parser.parse_args(argv)
    checks = validate_tree(Path(args.path), args.renderer, Path(args.repo_root) if args.repo_root else None)
    for check in checks:
        if check.ok and not args.quiet:
            print(f"PASS  {check.rule:<17} {check.target}")
        elif not check.ok:
            print(f"FAIL  {check.rule:<17} {check.target}")
            for err in check.errors:
                print(f"        - {err}")
    failed = sum(not c.ok for c in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0
