"""Static checks of the container images' Dockerfiles (no Docker engine runs here).

What a build would otherwise reveal late: the image runs as root, Ray drifts from the
version the manifests declare, the base image floats (``latest``), the tools KubeRay's
probes call (bash, wget) are missing, or a manifest uses a tag no Dockerfile builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_ARG_REF = re.compile(r"\$\{?(\w+)\}?")


@dataclass
class Stage:
    base: str
    name: str = ""
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; continuation lines joined."""
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    if buf:
        lines.append(buf)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG":
            name, _, default = rest.partition("=")
            (stages[-1].args if stages else global_args)[name.strip()] = default.strip().strip('"')
        elif op == "FROM":
            parts = rest.split()
            base = _ARG_REF.sub(lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=base, name=name))
        elif stages:
            stages[-1].instructions.append((op, rest))
    return global_args, stages


def _user_ok(user: str) -> bool:
    uid = user.split(":")[0].strip()
    return uid.isdigit() and int(uid) != 0


def check_dockerfile(path: Path, ray_version: str, gpu: bool) -> list[str]:
    """Problems with one Dockerfile ([] when it passes)."""
    errors: list[str] = []
    try:
        global_args, stages = parse(path.read_text())
    except OSError as exc:
        return [f"cannot read {path}: {exc}"]
    if not stages:
        return ["no FROM instruction"]
    final = stages[-1]
    for st in stages:
        if st.base.endswith(":latest") or ":" not in st.base.rsplit("/", 1)[-1]:
            errors.append(f"base image {st.base!r} must have a fixed tag")
    users = [rest for op, rest in final.instructions if op == "USER"]
    if not users:
        errors.append("final stage has no USER: the image would run as root")
    elif not _user_ok(users[-1]):
        errors.append(f"final USER {users[-1]!r} must be a numeric non-zero uid (runAsNonRoot checks it)")
    declared = [st.args["RAY_VERSION"] for st in stages if "RAY_VERSION" in st.args]
    if "RAY_VERSION" in global_args:
        declared.append(global_args["RAY_VERSION"])
    if not declared:
        errors.append("no ARG RAY_VERSION")
    for value in declared:
        if value != ray_version:
            errors.append(f"ARG RAY_VERSION={value} but pyproject.toml pins ray=={ray_version}")
    runs = " ".join(rest for st in stages for op, rest in st.instructions if op == "RUN")
    if not re.search(r"ray\[[^\]]*\]==\$\{?RAY_VERSION\}?", runs):
        errors.append("Ray is not installed as ray[...]==${RAY_VERSION}")
    final_runs = " ".join(rest for op, rest in final.instructions if op == "RUN")
    for tool in ("wget", "bash"):
        if not re.search(rf"\b{tool}\b", final_runs):
            errors.append(f"runtime stage does not install {tool} (KubeRay's command and probes use it)")
    copies = " ".join(rest for st in stages for op, rest in st.instructions if op == "COPY")
    for pkg in ("proxmo", "services", "pyproject.toml"):
        if pkg not in copies:
            errors.append(f"the project ({pkg}) is not copied into the image")
    is_cuda = "nvidia/cuda" in final.base
    if gpu and not is_cuda:
        errors.append(f"GPU image must build on a CUDA base, got {final.base!r}")
    if not gpu and is_cuda:
        errors.append("CPU image must not build on a CUDA base")
    return errors


def cuda_variant(path: Path) -> str | None:
    """The tag variant ("cu128") a CUDA Dockerfile produces, from its base image."""
    _, stages = parse(path.read_text())
    match = re.search(r"nvidia/cuda:(\d+)\.(\d+)", stages[-1].base) if stages else None
    return f"cu{match.group(1)}{match.group(2)}" if match else None
