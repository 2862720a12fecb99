"""Monitoring after training (issue 15): chunks, SPEEstimator.estimate_chunks and `estimate --chunk-by`."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from PIL import Image

from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate.inputs import chunk_groups
from spe_lightning.monitoring.chunks import (
    chunk_rows,
    chunks_by_column,
    chunks_of,
    find_meta,
    parse_chunk_by,
    read_meta,
    split,
)
from spe_lightning.testing import Blobs, TinyNet, loader, tiny_spe, tiny_trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """TinyNet trained 4 epochs with SPE (alert_below dice 0.99): (estimator, model, checkpoint path, target set)."""
    torch.manual_seed(0)
    ref, cal, tgt = Blobs(16, seed=1), Blobs(10, seed=2), Blobs(12, seed=3, noise=0.15)
    # no calibration pairs (G's residual intervals): this 4-epoch toy's pairs show SPE does not track its Dice, so
    # its Dice would be withheld as unreliable (tests/unit/engine/test_intervals.py); these tests are about chunks
    # and alerts
    cb = tiny_spe(
        reference=ref, calibration=cal, target=tgt, interval_subsets=0, interval_shifts=[], alert_below={"dice": 0.99}
    )
    root = tmp_path_factory.mktemp("fit")
    trainer = tiny_trainer(root, 4, [cb])
    model = TinyNet()
    trainer.fit(model, loader(ref))
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    est = cb.run.estimator  # the run's fitted estimator, built once at fit end
    assert est is not None
    return est, model.eval(), ckpt, tgt


def test_chunk_helpers(tmp_path):
    assert chunks_of(5, 2) == {"0-1": [0, 1], "2-3": [2, 3], "4-4": [4]}
    with pytest.raises(ValueError):
        chunks_of(5, 0)
    rows = [{"id": "a", "date": "2024-02"}, {"id": "b", "date": "2024-01"}, {"id": "c", "date": ""}]
    assert chunks_by_column(["sub/a", "b", "c", "a"], rows, "date") == {
        "(empty)": [2],
        "2024-01": [1],
        "2024-02": [0, 3],
    }
    with pytest.raises(ValueError, match="no row"):
        chunks_by_column(["zz"], rows, "date")
    with pytest.raises(ValueError, match="no column"):
        chunks_by_column(["a"], rows, "scanner")
    assert parse_chunk_by("100") == 100 and parse_chunk_by("meta.csv:date") == ("meta.csv", "date")
    with pytest.raises(ValueError):
        parse_chunk_by("date")
    (tmp_path / "site" / "test" / "images").mkdir(parents=True)
    (tmp_path / "site" / "meta.csv").write_text("id,scanner\nx,A\n")
    found = find_meta("meta.csv", tmp_path / "site" / "test" / "images")
    assert found == tmp_path / "site" / "meta.csv" and read_meta(found) == [{"id": "x", "scanner": "A"}]
    with pytest.raises(FileNotFoundError):
        find_meta("other.csv", tmp_path / "site" / "test" / "images")


def test_chunk_by_errors_name_the_users_meta_file(tmp_path):
    """``--chunk-by sites.csv:hospital``: the errors name sites.csv (as found), not "meta.csv"."""
    images = tmp_path / "study" / "images"
    images.mkdir(parents=True)
    sites = tmp_path / "study" / "sites.csv"  # found in the images folder's parent
    sites.write_text("id,scanner\na,A\n")
    name = re.escape(str(sites))
    with pytest.raises(ValueError, match=f"^{name} has no column 'hospital'; its columns: \\['id', 'scanner'\\]"):
        chunk_groups("sites.csv:hospital", ["a"], images)
    with pytest.raises(ValueError, match=f"^1 image\\(s\\) have no row in {name} \\(matched on 'id'\\)"):
        chunk_groups("sites.csv:scanner", ["a", "b"], images)
    sites.write_text("id,hospital\n")
    with pytest.raises(ValueError, match=f"^{name} has no rows"):
        chunk_groups(f"{sites}:hospital", ["a"], images)  # as given
    assert chunk_groups("5", ["a", "b"], images) == ({"0-1": [0, 1]}, "5 images per chunk, in file order")
    with pytest.raises(ValueError, match="^meta.csv has no rows"):  # without a file name: as before
        chunks_by_column(["a"], [], "date")


def test_split_takes_every_kind_of_chunker():
    assert split(5, 5) == {"0-4": [0, 1, 2, 3, 4]}
    assert split({"a": [0, 2], "b": [1]}, 3) == {"a": [0, 2], "b": [1]}
    assert split([[1], [0, 2]], 3) == {"0": [1], "1": [0, 2]}
    assert split(lambda n: {"odd": list(range(1, n, 2)), "even": list(range(0, n, 2))}, 4) == {
        "odd": [1, 3],
        "even": [0, 2],
    }
    with pytest.raises(TypeError, match="images per chunk"):
        split(True, 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        split({"a": [3]}, 3)
    with pytest.raises(ValueError, match="empty"):
        split(lambda n: {"none": []}, 3)


def test_estimate_chunks_one_chunk_equals_estimate_and_alerts_per_chunk(fitted):
    est, model, _, tgt = fitted
    whole = est.estimate(model, tgt, name="target", per_case=False)
    one = est.estimate_chunks(model, tgt, {"all": list(range(len(tgt)))}, name="target")
    assert one.chunks[0]["estimates"]["dice"]["value"] == pytest.approx(whole.estimates["dice"]["value"], abs=1e-6)
    assert one.chunks[0]["true"]["dice"] == pytest.approx(whole.true["dice"], abs=1e-6)
    by_function = est.estimate_chunks(model, tgt, lambda n: {"all": list(range(n))}, name="target")
    assert by_function.to_dict() | {"seconds": None} == one.to_dict() | {"seconds": None}
    steps = []
    res = est.estimate_chunks(model, tgt, 5, name="target", masks=whole.masks, progress=steps.append)
    assert [c["chunk"] for c in res.chunks] == ["0-4", "5-9", "10-11"] and steps == [1, 1, 1]
    assert res.thresholds["alert_below"] == {"dice": 0.99}  # the run's thresholds by default
    assert [a["chunk"] for a in res.alerts] == ["0-4", "5-9", "10-11"]  # Dice < 0.99 everywhere
    for c in res.chunks:
        e = c["estimates"]["dice"]
        assert e["lower"] <= e["value"] <= e["upper"] and c["true"]["dice"] is not None
    none = est.estimate_chunks(model, tgt, 6, name="target", alert_below={"dice": 0.0}, alert_on="lower")
    assert none.alerts == [] and none.seconds["predict"] >= 0 and none.seconds["estimate"] > 0
    rows = chunk_rows(res.chunks)
    assert len(rows) == 3 * len(est.keys) and {r["alert"] for r in rows if r["metric"] == "dice"} == {1}
    json.dumps(res.to_dict(), allow_nan=False)
    with pytest.raises(ValueError):
        est.estimate_chunks(model, tgt, [[0, 99]])


@pytest.mark.parametrize("run_label_key", ["label", "mask"])
def test_cli_chunk_by_column_writes_chunks_csv_and_plot(fitted, tmp_path, capsys, run_label_key):
    est, _, ckpt, tgt = fitted
    path = tmp_path / "spe_estimator.pt"
    # "mask": a run whose own dataset kept its masks under another key; --masks must still report the truth
    est.with_fitted(est.fitted.replace(config=est.config.replace(label_key=run_label_key))).save(path)
    images = tmp_path / "site" / "test" / "images"
    masks = images.parent / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    lines = ["id,split,date"]
    for i in range(len(tgt)):
        img = (tgt[i]["image"][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(img).save(images / f"case_{i:02d}.png")
        Image.fromarray((tgt[i]["label"][0].numpy() > 0).astype("uint8")).save(masks / f"case_{i:02d}.png")
        lines.append(f"case_{i:02d},test,2024-0{1 + i % 3}")
    (tmp_path / "site" / "meta.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["estimate", "--ckpt", str(ckpt), "--estimator", str(path), "--images", str(images), "--out", str(out)]
    args += ["--model", "spe_lightning.testing.TinyNet", "--no-progress", "--chunk-by", "meta.csv:date"]
    cli_main([*args, "--alert-below", "dice=0.99", "--alert-above", "hd95=1000", "--masks", str(masks)])
    printed = capsys.readouterr().out
    assert "| 2024-01 | 4 |" in printed and "SPE alert: target dice" in printed and "model inference" in printed
    summary = json.loads((out / "estimate.json").read_text())
    chunks = summary["chunks"]
    assert [c["chunk"] for c in chunks["chunks"]] == ["2024-01", "2024-02", "2024-03"]
    assert chunks["alert_below"] == {"dice": 0.99} and len(chunks["alerts"]) == 3
    assert all(0 < c["true"]["dice"] <= 1 for c in chunks["chunks"]) and summary["true"]["dice"] is not None
    rows = list(csv.DictReader((out / "chunks.csv").open()))
    dice = [r for r in rows if r["metric"] == "dice"]
    assert [r["chunk"] for r in dice] == ["2024-01", "2024-02", "2024-03"] and {r["alert"] for r in dice} == {"1"}
    page = (out / "report.html").read_text()
    assert "Monitoring: estimate per chunk" in page and page.count("data:image/png;base64,") == 4
    cli_main([*args[:-2], "--chunk-by", "5"])  # N images per chunk, the run's thresholds
    assert [c["chunk"] for c in json.loads((out / "estimate.json").read_text())["chunks"]["chunks"]] == [
        "0-4",
        "5-9",
        "10-11",
    ]
    with pytest.raises(SystemExit):
        cli_main([*args[:-2], "--chunk-by", "meta.csv:scanner"])
    assert "no column 'scanner'" in capsys.readouterr().err
