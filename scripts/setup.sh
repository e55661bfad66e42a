#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install trpl_fast with the given
# extras (default: dev). Safe to run again. Never pulls CUDA wheels onto a CPU-only machine:
# torch is installed first, from a local CPU wheel if pip can find one, else from pip's
# configured index (or TORCH_INDEX_URL); with a GPU (nvidia-smi present) the default CUDA build.
#   VENV=path         where the environment lives (default .venv)
#   PYTHON=python3    the interpreter that creates it
#   TORCH_VERSION     torch version for CPU machines (default 2.13.0)
#   TORCH_INDEX_URL   an extra index to find that CPU build in, when pip's configured index
#                     only has CUDA builds (e.g. PyTorch's own CPU wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.6"
  elif "${PIP[@]}" --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==$TORCH_VERSION"   # the local CPU wheel is in; now its small deps
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "torch==$TORCH_VERSION"
  fi
fi
"${PIP[@]}" -e ".[${EXTRAS}]"
"$PY" -c "import torch, trpl_fast; print('trpl_fast', trpl_fast.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
