#!/usr/bin/env bash
# Set up (scripts/setup.sh dev,rl: the RL tests need gymnasium / mujoco / envpool) and run
# the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,rl
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
