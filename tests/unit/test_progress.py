"""Progress of the long steps (issue 26 item 4): a line per ~10% with an ETA in logs, nothing when disabled."""

from __future__ import annotations

import io
import re

import pytest
import torch

from spe_lightning.progress import Progress, format_seconds
from spe_lightning.reverse.learned import LearnedPropagationSegmenter
from spe_lightning.testing import Blobs, TinyNet, loader, tiny_spe, tiny_trainer


def test_non_interactive_log_gets_a_line_per_tenth_with_eta():
    out = io.StringIO()  # not a TTY: lines, never a bar's carriage returns
    bar = Progress(800, "SPE: fitting learned_propagation", unit="step", stream=out)
    assert bar.mode == "lines"
    for _ in range(800):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "SPE: fitting learned_propagation: 0/800 step"
    progress = lines[1:]
    assert len(progress) == 10 and "\r" not in out.getvalue()
    assert [int(re.search(r": (\d+)%", ln).group(1)) for ln in progress] == list(range(10, 101, 10))
    assert all(re.search(r"elapsed \d+:\d\d, ETA \d+:\d\d$", ln) for ln in progress)
    assert progress[-1].endswith("ETA 0:00") and "(800/800 step)" in progress[-1]


def test_few_units_and_big_updates_still_give_at_most_a_line_per_tenth():
    out = io.StringIO()
    bar = Progress(3, "pairs", unit="set", stream=out)
    for _ in range(3):
        bar.update(1)
    assert [ln.split(": ")[1].split()[0] for ln in out.getvalue().splitlines()] == ["0/3", "33%", "66%", "100%"]
    out = io.StringIO()
    bar = Progress(1000, "x", stream=out)
    bar.update(1000)  # one jump over every tenth: one line
    assert len(out.getvalue().splitlines()) == 2


def test_disabled_prints_nothing(capsys):
    out = io.StringIO()
    with Progress(100, "quiet", enabled=False, stream=out) as bar:
        for _ in range(100):
            bar.update(1)
    assert bar.mode == "off" and out.getvalue() == ""
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar():
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    with Progress(10, "bar", stream=out) as bar:
        assert bar.mode == "bar"
        bar.update(10)
    assert "\rbar:   0%|" in out.getvalue() and "ETA" not in out.getvalue()  # tqdm's bar, not the log lines


def test_format_seconds():
    assert (format_seconds(5), format_seconds(75.2), format_seconds(3725)) == ("0:05", "1:15", "1:02:05")


def _fit(tmp_path, enable_progress_bar: bool, verbose: bool = True):
    torch.manual_seed(0)
    ref, cal, tgt = Blobs(12, seed=1), Blobs(8, seed=2), Blobs(8, seed=3)
    seg = LearnedPropagationSegmenter(steps=20, size=32, downsample=1, width=8, batch=4, max_supports=4)
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, segmenter=seg, verbose=verbose, fit_cache=None)
    trainer = tiny_trainer(tmp_path, 3, [cb], enable_progress_bar=enable_progress_bar)
    trainer.fit(TinyNet(), loader(ref))
    return cb


def test_trainer_progress_bar_shows_the_learned_fit_and_the_calibration_pairs(tmp_path, capsys):
    cb = _fit(tmp_path, enable_progress_bar=True)
    err = capsys.readouterr().err  # captured: not a TTY, so the log lines
    assert cb.run.show_progress
    fit_lines = [ln for ln in err.splitlines() if ln.startswith("SPE: fitting learned_propagation: ")]
    assert len(fit_lines) == 11 and fit_lines[-1].startswith("SPE: fitting learned_propagation: 100% (20/20 step)")
    assert any(ln.startswith("SPE: calibration pairs: 100%") and "ETA" in ln for ln in err.splitlines())


@pytest.mark.parametrize("enable_progress_bar, verbose", [(False, True), (True, False)])
def test_no_progress_without_the_trainer_bar_or_when_quiet(tmp_path, capsys, enable_progress_bar, verbose):
    cb = _fit(tmp_path, enable_progress_bar=enable_progress_bar, verbose=verbose)
    err = capsys.readouterr().err
    assert cb.report.reason is None  # the steps ran
    assert "SPE: fitting learned_propagation:" not in err and "SPE: calibration pairs:" not in err


@pytest.mark.parametrize("show", [True, False])
def test_quality_regressor_fit_shows_its_epochs(capsys, show):
    from spe_lightning import SPEConfig, SPEEstimator
    from spe_lightning.data import SyntheticShapesDataset
    from spe_lightning.estimator import FittedSPE, with_case_scorer
    from spe_lightning.percase.regressor import QualitySettings, RegressorScorer
    from spe_lightning.reverse import make_segmenter

    torch.manual_seed(0)
    ref, cal = SyntheticShapesDataset(12, 32, seed=1), SyntheticShapesDataset(8, 32, seed=2)
    est = SPEEstimator(FittedSPE(SPEConfig(metrics=("dice",), working_size=32), make_segmenter("label_fusion").spec()))
    settings = QualitySettings(size=32, widths=(8, 8, 16, 16), per_case=4, epochs=5, batch_size=32, n_models=2)
    with_case_scorer(est, TinyNet(), RegressorScorer(settings), cal, ref, progress=show)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("SPE: fitting the quality regressor")]
    if show:  # 5 epochs x 2 members
        assert len(lines) == 11 and "100% (10/10 epoch)" in lines[-1] and "ETA" in lines[-1]
    else:
        assert lines == []
