#!/usr/bin/env bash
# The release check: build the sdist and the wheel (the wheel from the sdist), `twine check` them,
# install the wheel (not editable) into a fresh virtual environment outside the checkout and use it
# from a scratch folder: import, --help, --version, a short fit of the demo config and
# `spe-lightning estimate` on its output. A module or data file missing from the wheel fails here.
#
#   bash scripts/smoke_wheel.sh            (after scripts/setup.sh: .venv has build and twine)
#
# Environment: PYTHON (the interpreter of the fresh venv, default python3), BUILD_PYTHON (the one with
# build and twine, default .venv/bin/python), KEEP=1 keeps the scratch folder for a look afterwards.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUILD_PY=${BUILD_PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spe-smoke.XXXXXX")
case "$WORK" in "$REPO"/*) echo "smoke_wheel: scratch folder $WORK is inside the checkout" >&2; exit 1 ;; esac
if [ "${KEEP:-0}" = 1 ]; then echo "smoke_wheel: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
t0=$SECONDS
say() { echo "smoke_wheel [$((SECONDS - t0))s]: $*"; }

say "building the sdist and the wheel"
"$BUILD_PY" -m build --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
"$BUILD_PY" -m twine check --strict "$WORK/dist"/*
WHEEL=$(ls "$WORK"/dist/*.whl)
# the listing goes to a file first: `grep -q` stops reading at its first match, and under pipefail the lister's
# broken pipe then failed the check although the licence was there (seen once in CI)
"$BUILD_PY" -m zipfile -l "$WHEEL" > "$WORK/wheel_files.txt"
grep -q "dist-info/licenses/LICENSE" "$WORK/wheel_files.txt" || { echo "smoke_wheel: LICENSE missing from the wheel" >&2; exit 1; }

say "installing the wheel into a fresh venv ($WORK/venv)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q torch==2.13.0  # first, so that pip never resolves a (multi-GB) CUDA build
"$VPY" -m pip install -q "$WHEEL"
SPE="$WORK/venv/bin/spe-lightning"

# from a scratch folder, with nothing of the checkout importable
mkdir "$WORK/scratch"
cd "$WORK/scratch"
unset PYTHONPATH
export SPE_NO_DOWNLOAD=1 SPE_CACHE_DIR="$WORK/fit_cache" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

say "import"
VERSION=$("$VPY" - "$WORK/venv" <<'EOF'
import sys
from pathlib import Path

import spe_lightning
from spe_lightning import SPECallback, SPEConfig, SPEEstimator, SPERun  # noqa: F401  (the lazy exports resolve)

where = Path(spe_lightning.__file__).resolve()
assert Path(sys.argv[1]).resolve() in where.parents, f"imported from {where}, not the fresh venv"
assert (where.parent / "py.typed").is_file(), "py.typed missing from the wheel"
print(spe_lightning.__version__)
EOF
)
say "spe-lightning $VERSION imported from the venv"

say "spe-lightning --help / --version"
"$SPE" --help >"$WORK/help.txt"
grep -q "estimate" "$WORK/help.txt"
[ "$("$SPE" --version)" = "spe-lightning $VERSION" ] || { echo "--version: $("$SPE" --version)" >&2; exit 1; }

say "a short fit of the demo config"
cp "$REPO/configs/synthetic.yaml" .
# label fusion instead of the offline default's learned reverse step: its one-off fit (about 1 min on
# 2 idle cores, 20 on a busy machine) tests nothing about packaging; the test suite covers it
"$SPE" fit --config synthetic.yaml \
    --trainer.max_epochs=3 --trainer.enable_progress_bar=false --trainer.enable_checkpointing=true \
    --data.n_train=48 --data.n_val=16 --data.n_target=16 --trainer.callbacks.init_args.config.segmenter=label_fusion
RUN=$(ls -d spe_runs/synthetic/tb/version_* | tail -n 1)
CKPT=$(ls "$RUN"/checkpoints/*.ckpt | tail -n 1)
test -s "$RUN/spe_report.json" && test -s "$RUN/spe_estimator.pt"

say "spe-lightning estimate on the fit's output"
"$VPY" - <<'EOF'
# a folder of 8-bit PNGs of the demo's shifted target, as a user would have their images
from pathlib import Path

from PIL import Image

from spe_lightning.data import SyntheticShapesDataModule

dm = SyntheticShapesDataModule(n_train=4, n_val=4, n_target=16, size=64)
dm.setup()
Path("images").mkdir()
for i, item in enumerate(dm.targets["target_noisy"]):
    Image.fromarray((item["image"][0].numpy() * 255).round().astype("uint8")).save(f"images/case_{i:02d}.png")
EOF
"$SPE" estimate --ckpt "$CKPT" --estimator "$RUN/spe_estimator.pt" --images images --out estimate --no-progress
"$VPY" - "$VERSION" <<'EOF'
import json
import sys

summary = json.load(open("estimate/estimate.json"))
assert summary["n_images"] == 16, summary["n_images"]
dice = summary["estimates"]["dice"]
assert dice["value"] is not None and dice["lower"] <= dice["value"] <= dice["upper"], dice
assert summary["spe_lightning"] == {"running": sys.argv[1], "estimator_written_by": sys.argv[1]}
page = open("estimate/report.html").read()
assert page.count("data:image/png;base64,") >= 3 and "Per-case quality" in page
print(f"smoke_wheel: estimated Dice {dice['value']:.3f} [{dice['lower']:.3f}, {dice['upper']:.3f}] on 16 images")
EOF
say "passed"
