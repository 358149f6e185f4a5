"""proxmo/ stays a light, pure library: it may import only torch, numpy, scikit-learn,
the standard library and itself (DESIGN.md, layers). Checked on the source, so a lazy
import inside a function counts too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PROXMO = Path(__file__).resolve().parents[2] / "proxmo"
ALLOWED = {"torch", "numpy", "sklearn", "proxmo", "__future__"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside proxmo
                continue
            roots.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_proxmo_imports_only_allowed_packages():
    files = sorted(PROXMO.rglob("*.py"))
    assert len(files) >= 5
    stdlib = set(sys.stdlib_module_names)
    bad = {f"{p.relative_to(PROXMO.parent)}: {m}" for p in files for m in imported_roots(p)
           if m not in ALLOWED and m not in stdlib}
    assert not bad, f"proxmo/ must not import these: {sorted(bad)}"


def test_checker_catches_forbidden_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import ray\nfrom services.config import X\nimport importlib\nimportlib.import_module('redis')\n")
    assert imported_roots(f) >= {"ray", "services", "redis"}
