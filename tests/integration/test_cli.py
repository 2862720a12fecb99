"""`spe-lightning fit` (LightningCLI) with the callback from YAML and from flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _demo import CHEAP_SPE, CONFIG, SMALL

from spe_lightning import SPEConfig
from spe_lightning.cli import cli, main
from spe_lightning.lightning.settings import find_moved_settings


def _report(root: Path) -> dict:
    (path,) = root.rglob("spe_report.json")
    return json.loads(path.read_text())


def test_fit_from_yaml_config(demo_fit_in_scratch_dir):
    """The demo config with SMALL and CHEAP_SPE as flags (the run is shared with test_outputs: conftest)."""
    report = _report(demo_fit_in_scratch_dir)
    assert len(report["records"]) == 3
    assert set(report["estimates"]) == {"target", "target_noisy"}
    assert report["config"]["working_size"] == 32


def test_fit_with_callback_from_flags(tmp_path):
    cfg = tmp_path / "no_callbacks.yaml"
    text = CONFIG.read_text()
    cfg.write_text(text.split("  callbacks:")[0] + "model:" + text.split("model:", 1)[1])
    cli(
        [
            "fit",
            "--config",
            str(cfg),
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks+=spe_lightning.SPECallback",
            "--trainer.callbacks.config.segmenter=label_fusion",
            "--trainer.callbacks.config.support_size=8",
            "--trainer.callbacks.config.metrics=[dice,hd95]",
            *(flag.replace(".init_args.", ".") for flag in CHEAP_SPE),  # working size 32 among them
        ]
    )
    report = _report(tmp_path)
    assert report["metrics"] == ["dice", "hd95"]
    assert report["config"]["support_size"] == 8


def test_bad_callback_argument_is_reported_before_training(tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                *SMALL,
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks.init_args.config.every_n_epochs=0",
            ]
        )
    assert "every_n_epochs must be an int >= 1" in str(err.value) + capsys.readouterr().err
    assert not list(tmp_path.rglob("*.tfevents.*"))


def test_old_flat_setting_names_its_new_place(tmp_path, capsys):
    """Settings moved under the callback's `config`: the old flat key or flag fails before training, saying where."""
    flat = tmp_path / "flat.yaml"
    text = CONFIG.read_text()
    old_callback = (
        "  callbacks:\n    - class_path: spe_lightning.SPECallback\n      init_args: {every_n_epochs: 1, seed: 0}\n"
    )
    flat.write_text(text.split("  callbacks:")[0] + old_callback + "model:" + text.split("model:", 1)[1])
    for args in (
        ["--config", str(flat)],
        ["--config", str(CONFIG), "--trainer.callbacks.init_args.support_size=8"],
    ):
        with pytest.raises(SystemExit) as err:
            main(["fit", *args, *SMALL, f"--trainer.default_root_dir={tmp_path}"])
        assert err.value.code == 2
        message = capsys.readouterr().err
        assert "settings moved under its `config`" in message and "init_args.config." in message
    assert not list(tmp_path.rglob("*.tfevents.*"))


@pytest.mark.parametrize("path", sorted(CONFIG.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_put_the_settings_under_config(path):
    """Every shipped config's SPECallback settings are a valid SPEConfig under init_args.config, none left flat."""
    assert find_moved_settings(["--config", str(path)]) is None
    cfg = yaml.safe_load(path.read_text())
    (spe,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "spe_lightning.SPECallback"]
    assert set(spe["init_args"]) == {"config"}
    assert SPEConfig(**spe["init_args"]["config"]).every_n_epochs == 1


def test_classes_as_a_list_in_yaml_reach_the_config(tmp_path):
    """SPEConfig.classes takes a list (normalised to names) from LightningCLI, as from Python."""
    parsed = cli(
        [
            "--config",
            str(CONFIG),
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks.init_args.config.classes=[1]",
        ],
        run=False,
    )
    (spe,) = [c for c in parsed.trainer.callbacks if type(c).__name__ == "SPECallback"]
    assert spe.config.classes == {"class_1": 1} and spe.config.every_n_epochs == 1


@pytest.mark.ddp
def test_demo_config_under_ddp_spawn_writes_one_complete_report(tmp_path):
    """Rank zero's publishing must not wait on a collective the other rank has left (trainer.log_dir broadcasts);
    the fit-end calibration pairs are measured sharded over both processes, so the intervals come from them."""
    cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.strategy=ddp_spawn",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks.init_args.config.working_size=32",
            # spawned workers do not see conftest's patch
            "--trainer.callbacks.init_args.config.segmenter=label_fusion",
            "--trainer.callbacks.init_args.config.max_references=16",  # the pairs are counted below: keep them
        ]
    )
    reports = list(tmp_path.rglob("spe_report.json"))
    assert len(reports) == 1 and len(list(tmp_path.rglob("spe_estimator.pt"))) == 1
    report = json.loads(reports[0].read_text())
    assert report["reason"] is None and len(report["records"]) == 3
    # 8 generic calibration pairs, and one pair styled like each of the two targets
    assert len([p for p in report["pairs"] if p.get("target") is None]) == 8
    assert sorted(p["target"] for p in report["pairs"] if p.get("target")) == ["target", "target_noisy"]
    for target in ("target", "target_noisy"):
        assert report["estimates"][target]["dice"]["value"] is not None
    assert (reports[0].parent / "spe_report.csv").is_file() and (reports[0].parent / "spe_calibration.png").is_file()


def test_python_dash_m_runs_the_command_and_the_benchmark_harness_stays_off_the_import_path():
    """``python -m spe_lightning.cli`` is the console script; importing the package, the callback, the estimator
    and the command itself loads no module of spe_lightning.benchmarking (only ``benchmark`` imports it).

    One fresh interpreter for both (each start imports torch and Lightning: ~15 s on a loaded 2-core machine):
    the imports are listed first, then the package runs as ``-m`` runs it (``runpy.run_module`` with
    ``alter_sys=True`` is what ``python -m`` calls)."""
    import subprocess
    import sys

    from spe_lightning import __version__

    repo = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"}
    code = (
        "import runpy, sys, spe_lightning.callback, spe_lightning.estimator, spe_lightning.run, spe_lightning.cli;"
        "print(sorted(m for m in sys.modules if m.startswith('spe_lightning.benchmark')), flush=True);"
        "sys.argv = ['spe_lightning.cli', '--version'];"
        "runpy.run_module('spe_lightning.cli', run_name='__main__', alter_sys=True)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["[]", f"spe-lightning {__version__}"]
