#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a short default training run -- the
# paper's KL projection layer on HalfCheetah-v5 (EnvPool), 20,480 env steps -- then its
# deterministic evaluation and learning-curve plots. Extra arguments go to `trpl-fast train`
# (e.g. --steps 1000000, --algo ppo, --env Hopper-v5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,rl
bin="${VENV:-.venv}/bin"
out="${OUT:-runs/quickstart}"
"$bin/trpl-fast" train --steps 20480 --out "$out" --overwrite "$@"
"$bin/trpl-fast" eval "$out" --episodes 5
"$bin/trpl-fast" plot "$out" --out "$out/plots/curves.png"
