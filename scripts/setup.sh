#!/usr/bin/env bash
# Create .venv and install spe-lightning with its dev tools. torch==2.13.0 goes first so that
# pip never resolves a (multi-GB) CUDA build for the other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
