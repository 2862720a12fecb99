#!/usr/bin/env bash
# Build the documentation site (MkDocs + mkdocstrings) with warnings as errors into ./site.
# Uses .venv when it exists (scripts/setup.sh creates it), else the python on PATH; installs the
# docs extra (`pip install -e ".[docs]"`) only when mkdocs or mkdocstrings is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .venv ]; then . .venv/bin/activate; fi
PY=${PYTHON:-python}
if ! "$PY" -c "import mkdocs, mkdocstrings_handlers.python, spe_lightning" 2>/dev/null; then
    "$PY" -m pip install -q -e ".[docs]"
fi
# the API pages import nothing at build time (griffe reads the sources), but the settings page must be current
"$PY" scripts/settings_table.py | diff -u docs/settings.md - >/dev/null || {
    echo "docs/settings.md is stale: run  python scripts/settings_table.py > docs/settings.md" >&2
    exit 1
}
"$PY" -m mkdocs build --strict --clean --site-dir "${SITE_DIR:-site}" "$@"
