#!/usr/bin/env bash
# Gather into one folder every wheel an offline GPU machine that already has torch needs to run
# magcache-launch and scripts/gpu_check.py (diffusers, transformers, yunchang, ...), and nothing it
# has: torch, its CUDA libraries (nvidia-*) and triton are left out, which is what makes the
# folder small (tens of MB instead of GBs). setuptools and wheel are in it: `pip install -e .`
# builds the project in an isolated environment that needs them ([build-system] requires).
#
#   scripts/gpu_wheels.sh [OUT_DIR] [--python-version 3.11] [--platform manylinux2014_x86_64]
#   # then, on the GPU machine:  pip install --no-index --find-links OUT_DIR -e .  (torch already there)
#
# How: pip resolves the project's dependencies and build requirements once, for the target Python
# and platform (`pip install --dry-run --report --python-version X.Y --only-binary=:all:`, metadata
# only: torch is never downloaded), then downloads exactly those pinned versions, binary wheels
# only, without dependencies. tests/test_gpu_wheels.py proves the offline install from the folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/gpu_wheels}"
shift $(( $# > 0 ? 1 : 0 ))
PYVER=""
PLATFORM="manylinux2014_x86_64"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --platform) PLATFORM="$2"; shift 2 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (use OUT_DIR [--python-version X.Y] [--platform TAG])" >&2; exit 2 ;;
  esac
done
VPY="${MAGCACHE_VENV:-$ROOT/.venv}/bin/python"
[ -x "$VPY" ] || { echo "gpu_wheels.sh: no venv at $VPY; run scripts/setup.sh first" >&2; exit 2; }
PYVER="${PYVER:-$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$OUT"
report="$(mktemp)"
PLATFORMS=(--platform "$PLATFORM" --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any)
# the project's dependencies and build requirements, from pyproject.toml
reqs="$(mktemp)"
target="$(mktemp -d)"  # pip wants --target with a foreign --platform; a dry run leaves it empty
trap 'rm -rf "$report" "$reqs" "$target"' EXIT
"$VPY" - "$ROOT/pyproject.toml" > "$reqs" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
PY
# the full set for the target interpreter (a dry run: metadata only, nothing installed or downloaded)
"$VPY" -m pip install -q --dry-run --target "$target" --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" \
  --report "$report" -r "$reqs" 2>&1 | grep -v "is ignored" >&2 || true
"$VPY" - "$report" "$ROOT/pyproject.toml" > "$OUT/requirements.txt" <<'PY'
import json, re, sys
from packaging.requirements import Requirement
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

report = json.load(open(sys.argv[1]))
meta = {norm(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
# torch and everything it pulls in (filelock, sympy, its CUDA wheels, ...) is on the GPU machine already
torch_closure, todo = set(), ["torch"]
while todo:
    name = todo.pop()
    if name in torch_closure or name not in meta:
        continue
    torch_closure.add(name)
    for spec in meta[name].get("requires_dist") or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(norm(req.name))
# the build requirements (setuptools, wheel) stay even where torch pulls them in: the offline
# `pip install -e .` builds in an isolated environment that only the folder can fill
build = {norm(Requirement(r).name) for r in tomllib.load(open(sys.argv[2], "rb"))["build-system"]["requires"]}
skip = (torch_closure - build) | {"magcache-launch", "pip"}
for name, m in sorted(meta.items()):
    if name not in skip and not name.startswith("nvidia-"):
        print(f"{name}=={m['version']}")
PY
echo "gathering $(wc -l < "$OUT/requirements.txt") wheels for python $PYVER on $PLATFORM into $OUT" >&2
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" \
  -r "$OUT/requirements.txt" -d "$OUT" 2>&1 | grep -v "is ignored" >&2 || true
# the official package the comparison tests import (no dependencies, see scripts/setup.sh)
"$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" "${PLATFORMS[@]}" wan22==2.2.11 \
  -d "$OUT" 2>&1 | grep -v "is ignored" >&2 || true
missing=0
while read -r req; do
  name="${req%%==*}"; ver="${req##*==}"
  pattern="$(echo "$name" | sed 's/-/[-_]/g')-${ver}-"
  ls "$OUT" | grep -qi "^${pattern}" || { echo "missing wheel: $req" >&2; missing=1; }
done < "$OUT/requirements.txt"
du -sh "$OUT" >&2
exit $missing
