#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job. Extra arguments go to `trpl-fast demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${VENV:-.venv}/bin/trpl-fast" demo "$@"
