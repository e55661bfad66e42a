#!/usr/bin/env bash
# The tree's habits, checked before the tests (.ci/run): ruff's lint rules and its formatter,
# both configured in pyproject.toml. `bash scripts/lint.sh --fix` applies the fixes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${VENV:-.venv}/bin/ruff"
if [ "${1:-}" = "--fix" ]; then
  "$RUFF" check --fix .
  "$RUFF" format .
else
  "$RUFF" check .
  "$RUFF" format --check .
fi
