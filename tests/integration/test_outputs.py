"""Nothing is written to the working directory by default: SPE's files go to the configured log directory."""

from __future__ import annotations

from pathlib import Path

from _demo import CHEAP_SPE, CONFIG, SMALL

from spe_lightning.cli import cli

SPE_FILES = {"spe_report.json", "spe_report.csv", "spe_calibration.png", "spe_estimator.pt"}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _written_only_under_the_log_dir(root: Path, report_dir: str) -> None:
    files = _files(root)
    assert files, "the run wrote nothing"
    outside = sorted(f for f in files if not f.startswith("spe_runs/synthetic/"))
    assert not outside, f"written outside the configured log directory: {outside}"
    spe = {f.rsplit("/", 1)[-1]: f for f in files if f.rsplit("/", 1)[-1] in SPE_FILES}
    assert set(spe) == SPE_FILES
    assert {f.rsplit("/", 1)[0] for f in spe.values()} == {report_dir}


def test_demo_config_from_a_scratch_directory_writes_only_under_its_log_dir(demo_fit_in_scratch_dir):
    """The demo config as shipped (shrunk by SMALL and CHEAP_SPE; the run is shared with test_cli: conftest):
    SPE's files beside TensorBoard's events. Which files are written does not depend on CHEAP_SPE."""
    _written_only_under_the_log_dir(demo_fit_in_scratch_dir, "spe_runs/synthetic/tb/version_0")


def test_demo_config_without_a_logger_writes_only_under_its_root_dir(tmp_path, monkeypatch):
    """No logger: SPE's files under default_root_dir's spe_reports."""
    monkeypatch.chdir(tmp_path)
    cli(["fit", "--config", str(CONFIG), *SMALL, *CHEAP_SPE, "--trainer.logger=false"])
    _written_only_under_the_log_dir(tmp_path, "spe_runs/synthetic/spe_reports")


def test_trainer_without_logger_or_root_dir_keeps_reports_in_their_own_folder(tmp_path, monkeypatch):
    """A bare ``Trainer(logger=False)`` (default_root_dir = cwd) gets ``./spe_reports/``, not loose files."""
    import lightning.pytorch as pl

    from spe_lightning import SPECallback

    monkeypatch.chdir(tmp_path)
    cb = SPECallback(log_dir=None)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    assert cb.report_dir(trainer) == tmp_path / "spe_reports"
    assert SPECallback(log_dir=str(tmp_path / "mine")).report_dir(trainer) == tmp_path / "mine"
    with_tb = pl.Trainer(default_root_dir=tmp_path / "root", enable_checkpointing=False)  # default TensorBoard/CSV
    assert cb.report_dir(with_tb) == Path(with_tb.log_dir)
    assert not list(tmp_path.iterdir())  # asking wrote nothing
