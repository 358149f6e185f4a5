"""`scripts/setup.sh` refuses to start a fresh install on a disk that cannot hold it.

A disk that fills half-way through pip leaves a broken .venv and an OSError deep in pip's
log (CI saw exactly that); the script checks the free space first and says what it needs.
"""
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _copy_script(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "setup.sh"
    shutil.copy(REPO / "scripts" / "setup.sh", script)
    return script


def test_fresh_install_stops_early_when_the_disk_is_too_small(tmp_path):
    script = _copy_script(tmp_path)
    proc = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PROXMO_SETUP_MIN_FREE_GB": "1000000"},
    )
    assert proc.returncode == 3, proc.stderr
    assert "a fresh install needs about 1000000 GB" in proc.stderr
    assert "PROXMO_SETUP_MIN_FREE_GB" in proc.stderr
    assert not (tmp_path / ".venv").exists(), "the check must run before the venv is made"


def test_the_check_passes_when_the_disk_has_room(tmp_path):
    # With a need of 0 GB the check passes and the script goes on to make the venv; a
    # python that does not exist stops it right there, so nothing is installed.
    script = _copy_script(tmp_path)
    proc = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PROXMO_SETUP_MIN_FREE_GB": "0",
             "PYTHON": "/nonexistent/python3"},
    )
    assert "fresh install needs" not in proc.stderr
    assert "/nonexistent/python3" in proc.stderr
    assert proc.returncode != 0
