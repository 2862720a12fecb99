"""benchmarks/pair_sizes.py: the sizes the current code records with each pair, added to older benchmark files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "pair_sizes.py"


def _script():
    spec = importlib.util.spec_from_file_location("pair_sizes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_older_pairs_get_the_sizes_a_current_run_records(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["id,split,group"] + [f"a{i},test,x" for i in range(7)] + [f"b{i},train,x" for i in range(3)]
    (data / "meta.csv").write_text("\n".join(rows) + "\n")
    subset = {"kind": "subset", "name": "subset5_1", "d_pseudo": {"dice": 0.01}, "d_real": {"dice": 0.02}}
    shift = {"kind": "shift", "name": "noise_2", "d_pseudo": {"dice": -0.1}, "d_real": {"dice": -0.2}}
    sized = {**subset, "name": "subset3_0", "n": 3, "n_calibration": 9}  # written by the current code: kept
    result = {
        "settings": {"data": str(data)},
        "shift_raw": {"learned": {"pairs": [subset, shift, sized], "styled_pairs": {"t": {**shift, "kind": "styled"}}}},
    }
    module = _script()
    assert module.add_sizes(result) == 3
    pairs = result["shift_raw"]["learned"]["pairs"]
    assert (pairs[0]["n"], pairs[0]["n_calibration"]) == (5, 7)  # the subset's name, the test split's size
    assert pairs[1]["n"] == 7 and "n_calibration" not in pairs[1]  # a shifted copy of the calibration set
    assert pairs[2] == sized
    assert result["shift_raw"]["learned"]["styled_pairs"]["t"]["n"] == 7
    assert {k: v for k, v in pairs[0].items() if k not in ("n", "n_calibration")} == subset  # nothing else moved
    assert module.add_sizes(result) == 0  # run twice: nothing more to add
