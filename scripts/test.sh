#!/usr/bin/env bash
# Set up, then run ruff, mypy and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check spe_lightning tests benchmarks examples
mypy  # the package; settings in pyproject.toml [tool.mypy]
# Two worker processes, whole files per worker (a file's fixtures are built once): the tests run one torch
# thread each (tests/conftest.py), so on 2 cores this halves the wall time. SPE_TEST_WORKERS=0: one process.
python -m pytest -q -p no:cacheprovider -n "${SPE_TEST_WORKERS:-2}" --dist loadfile "$@"
