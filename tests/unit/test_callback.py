"""SPECallback without a fit: settings refused at construction, checkpoint state on resume (docs/reliability.md)."""

from __future__ import annotations

import pytest
from _inputs import sets

from spe_lightning import SPECallback
from spe_lightning.testing import tiny_spe


def test_a_target_named_calibration_or_bad_classes_are_refused():
    ref, cal, _ = sets()
    with pytest.raises(ValueError, match="may not be called"):
        tiny_spe().run.prepare(ref, cal, {"calibration": cal})
    with pytest.raises(ValueError, match="not both"):
        SPECallback(foreground_class=1, classes=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        SPECallback(classes={"a": 1, "b": 1})


def test_resuming_with_other_settings_warns_or_raises_when_strict():
    saved = tiny_spe(support_size=6).state_dict() | {"records": [{"epoch": 0, "step": 1, "pseudo": {}, "real": {}}]}
    other = tiny_spe(support_size=8)
    with pytest.warns(UserWarning, match="different settings.*support_size"):
        other.load_state_dict(saved)
    assert len(other.records) == 1
    with pytest.raises(ValueError, match="support_size"):
        tiny_spe(support_size=8, strict=True).load_state_dict(saved)


def test_a_checkpoint_from_before_the_support_size_default_keeps_its_records():
    """Checkpoints saved when ``support_size`` defaulted to 64 are keyed by it: resuming with the new default
    (None) finds that state, keeps its records and says the setting changed (no silent fresh start)."""
    old = tiny_spe(support_size=64)
    saved = old.state_dict() | {"records": [{"epoch": 0, "step": 1, "pseudo": {}, "real": {}}]}
    checkpoint = {"callbacks": {old.state_key: saved}}
    new = tiny_spe(support_size=None)
    assert new.state_key != old.state_key
    new.on_load_checkpoint(None, None, checkpoint)
    with pytest.warns(UserWarning, match="different settings.*support_size"):
        new.load_state_dict(checkpoint["callbacks"][new.state_key])
    assert len(new.records) == 1
    other = tiny_spe(support_size=None, seed=1)  # another support size too: not taken, and said so
    checkpoint = {"callbacks": {old.state_key: saved}}
    with pytest.warns(UserWarning, match=r"another reverse segmenter, metrics or support size \(support_size"):
        other.on_load_checkpoint(None, None, checkpoint)
    assert other.state_key not in checkpoint["callbacks"]


def test_resuming_with_another_seed_or_schedule_continues_the_records_and_another_segmenter_says_it_starts_over():
    old = tiny_spe(every_n_epochs=1)
    saved = old.state_dict() | {"records": [{"epoch": 0, "step": 1, "pseudo": {}, "real": {}}]}
    for changed in ({"every_n_epochs": 2}, {"seed": 3}):
        checkpoint = {"callbacks": {old.state_key: saved}}
        new = tiny_spe(**{"every_n_epochs": 1, **changed})
        assert new.state_key != old.state_key
        new.on_load_checkpoint(None, None, checkpoint)
        with pytest.warns(UserWarning, match=f"different settings.*{next(iter(changed))}"):
            new.load_state_dict(checkpoint["callbacks"][new.state_key])
        assert len(new.records) == 1
    checkpoint = {"callbacks": {old.state_key: saved}}
    with pytest.warns(UserWarning, match="starts its records over"):
        tiny_spe(segmenter="pixel_knn").on_load_checkpoint(None, None, checkpoint)
    assert len(checkpoint["callbacks"]) == 1


def test_users_random_streams_are_restored_after_spes_work():
    import random

    import numpy as np
    import torch

    from spe_lightning.lightning.rng import users_rng_kept

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with users_rng_kept():  # whatever SPE draws in a hook
        torch.rand(5), np.random.rand(5), random.random(), torch.nn.Linear(4, 4)
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    with pytest.raises(RuntimeError, match="boom"), users_rng_kept():  # restored on an error too
        torch.rand(3)
        raise RuntimeError("boom")


def test_the_schedule_advice_says_what_to_change():
    from spe_lightning.lightning.schedule import schedule_advice, schedule_warning

    assert schedule_advice(4, 2) == "set every_n_epochs <= 1"
    assert schedule_advice(2, 1) == "train for at least 3 epochs"  # not "(or 3 with every_n_epochs=1)" again
    assert schedule_advice(2, 5) == "train for at least 15 epochs (or 3 with every_n_epochs=1)"
    assert schedule_warning(2, 1, 0).endswith("train for at least 3 epochs.")
    assert schedule_warning(2, 1, 1) is None  # a resumed run's record counts
