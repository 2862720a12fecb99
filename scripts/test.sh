#!/usr/bin/env bash
# Set up, then run ruff, mypy and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check spe_lightning tests benchmarks examples
mypy  # the package; settings in pyproject.toml [tool.mypy]
python -m pytest -q -p no:cacheprovider "$@"
