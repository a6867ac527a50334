#!/usr/bin/env bash
# Create (or reuse) the project venv and install magcache-launch into it.
# Installs a CPU build of torch first where there is no GPU, so that pip never resolves the
# multi-GB CUDA wheel on a CPU-only machine. Safe to run repeatedly: a stamp skips work.
# Usage: source scripts/setup.sh   (or: bash scripts/setup.sh; then . .venv/bin/activate)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAGCACHE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.magcache-setup-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import launcher, torch" 2>/dev/null; then
  exit 0 2>/dev/null || return 0
fi

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the default (CUDA) torch build" >&2
    "$VPY" -m pip install -q "torch>=2.6"
  else
    echo "[setup] no GPU: installing CPU torch==$TORCH_CPU_VERSION" >&2
    "$VPY" -m pip install -q "torch==$TORCH_CPU_VERSION" numpy 2>&1 | grep -v "is ignored" >&2 || true
    "$VPY" -c "import torch" || { echo "[setup] torch install failed" >&2; exit 1; }
  fi
fi
echo "[setup] installing magcache-launch (editable) and test tools" >&2
"$VPY" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "is ignored" >&2 || true
# The official Wan2.2 code (PyPI `wan22`, module `wan`, equal to GitHub Wan-Video/Wan2.2 at 42bf4cf in
# wan/modules and configs), for the tests that compare our forward with official's. Without its
# declared dependencies (flash-attn, decord, ...): the tests import only wan/modules/model.py.
"$VPY" -m pip install -q --no-deps "wan22==2.2.11" 2>&1 | grep -v "is ignored" >&2 || true
"$VPY" -c "import launcher, magcache, parallel, torch, diffusers, transformers, yunchang" \
  || { echo "[setup] install incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
