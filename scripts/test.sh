#!/usr/bin/env bash
# Run the whole test suite from a clean clone: set up the venv, then pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k schedule).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
. "${MAGCACHE_VENV:-$ROOT/.venv}/bin/activate"
cd "$ROOT"
# the layer and no-cycle contracts in pyproject.toml ([tool.importlinter]); fails fast, before the suite
lint-imports --no-cache
# --durations: the slowest tests, to keep the suite well under its CI limit
exec python -m pytest -q --durations=25 "$@"
