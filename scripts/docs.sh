#!/usr/bin/env bash
# Build the documentation site (MkDocs + mkdocstrings) with warnings as errors into ./site (SITE_DIR=...
# for another folder). Uses .venv (created by scripts/setup.sh when missing; PYTHON=... uses that
# interpreter instead) and installs the docs extra (`pip install -e ".[docs]"`) when mkdocs is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    [ -d .venv ] || bash scripts/setup.sh
    . .venv/bin/activate
    PYTHON=python
fi
if ! "$PYTHON" -c "import mkdocs, mkdocstrings_handlers.python, spe_lightning" 2>/dev/null; then
    "$PYTHON" -m pip install -q -e ".[docs]"
fi
# the settings page is generated from SPEConfig's field docstrings: a stale page fails the build
if ! "$PYTHON" scripts/settings_table.py | diff -q docs/settings.md - >/dev/null; then
    echo "docs/settings.md is stale: run  python scripts/settings_table.py > docs/settings.md" >&2
    exit 1
fi
"$PYTHON" -m mkdocs build --strict --clean --site-dir "${SITE_DIR:-site}" "$@"
