#!/usr/bin/env bash
# Set up, then train 8 epochs on the embedded phantom task with SPECallback (CPU, ~1-2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The demo never downloads: segmenter "auto" uses UniverSeg only if its weights are already here.
export SPE_NO_DOWNLOAD=1
spe-lightning fit --config configs/synthetic.yaml
echo "TensorBoard logs: $(ls -d spe_runs/synthetic/tb/version_* | tail -n 1)  (tensorboard --logdir spe_runs/synthetic/tb)"
