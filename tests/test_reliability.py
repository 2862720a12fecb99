"""Bad input: one test per row of the "Bad input" table (docs/reliability.md); plus resume and determinism."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import Dataset

from spe_lightning import SPECallback
from spe_lightning.engine.cached_set import cache_dataset
from spe_lightning.engine.predict import NonFiniteOutputError
from spe_lightning.testing import Blobs, TinyNet, finite_everywhere, loader, max_abs_diff, tiny_spe, tiny_trainer


def sets(fmt: str = "dict", n_classes: int = 1, **kw):
    return (
        Blobs(16, seed=1, n_classes=n_classes, fmt=fmt, **kw),
        Blobs(10, seed=2, n_classes=n_classes, fmt=fmt, **kw),
        {"t": Blobs(10, seed=3, n_classes=n_classes, noise=0.15, fmt=fmt, **kw)},
    )


def prepared(fmt: str = "dict", **kw) -> SPECallback:
    cb = tiny_spe(**kw)
    cb.run.prepare(*sets(fmt))
    return cb


def trained_net(**kw) -> TinyNet:
    """A TinyNet after a few quick steps (so that it predicts foreground), eval-ready."""
    torch.manual_seed(0)
    net = TinyNet(**kw)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    ref = Blobs(16, seed=1)
    batch = {"image": torch.stack([it["image"] for it in ref]), "label": torch.stack([it["label"] for it in ref])}
    for _ in range(30):
        opt.zero_grad()
        net.training_step(batch, 0).backward()
        opt.step()
    return net


# ------------------------------------------------------------------ rows of the table


@pytest.mark.parametrize("which", ["reference", "calibration", "target"])
def test_empty_dataset_fails_in_setup(tmp_path, which):
    ref, cal, tgt = sets()
    data = {"reference": ref, "calibration": cal, "target": tgt}
    data[which] = Blobs(0) if which != "target" else {"t": Blobs(0)}
    t = tiny_trainer(tmp_path, 1, [tiny_spe(**data)])
    with pytest.raises(ValueError, match="empty"):
        t.fit(TinyNet(), loader(ref))
    assert t.global_step == 0


def test_unlabelled_reference_or_reference_without_foreground_fails_in_setup():
    ref, cal, tgt = sets()
    with pytest.raises(ValueError, match="must return masks"):
        tiny_spe().run.prepare(Blobs(4, with_mask=False), cal, tgt)
    with pytest.raises(ValueError, match="no reference mask has"):
        tiny_spe(foreground_class=7).run.prepare(ref, cal, tgt)


def test_image_and_mask_of_different_size_fail_in_setup_naming_the_item():
    class Cropped(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            it = Blobs(3, seed=1)[i]
            return {"image": it["image"], "label": it["label"][:, :30] if i == 2 else it["label"]}

    ref, cal, tgt = sets()
    with pytest.raises(ValueError, match=r"calibration item 2: mask shape \(1, 30, 32\) does not match"):
        tiny_spe().run.prepare(ref, Cropped(), tgt)


def test_masks_as_0_255_float_bool_one_hot_or_soft_are_the_same_masks():
    base = cache_dataset("x", Blobs(6, seed=1), 32)
    for fmt in ("mask255", "onehot"):
        other = cache_dataset("x", Blobs(6, seed=1, fmt=fmt, n_classes=1 if fmt != "onehot" else 2), 32)
        if fmt == "onehot":  # any foreground class of a one-hot mask
            base2 = cache_dataset("x", Blobs(6, seed=1, n_classes=2), 32)
            assert all(torch.equal(a, b) for a, b in zip(other.masks, base2.masks))
        else:
            assert all(torch.equal(a, b) for a, b in zip(other.masks, base.masks))
    soft = [(m.float() * 0.8 + 0.1, m) for m in base.masks]  # soft masks in (0, 1): > 0.5
    again = cache_dataset("x", soft, 32)
    assert all(torch.equal(a, b) for a, b in zip(again.masks, base.masks))
    as_bool = cache_dataset("x", [(x, m.bool()) for x, m in soft], 32)
    assert all(torch.equal(a, b) for a, b in zip(as_bool.masks, base.masks))
    assert all(m.dtype == torch.bool and m.shape == (1, 32, 32) for m in base.masks)
    # class-index maps stored as floats (as MONAI loads them): any non-zero class, not "> 127.5"
    three = cache_dataset("x", [(x, m.float() * 2) for x, m in soft], 32)
    assert all(torch.equal(a, b) for a, b in zip(three.masks, base.masks))


def test_rgb_images_go_to_the_model_unchanged_and_to_the_reverse_step_as_gray():
    net = trained_net()  # its forward averages the channels, as a pretrained-RGB model may
    seen = []

    def logits(module, x):
        seen.append(tuple(x.shape))
        return module(x)

    gray, rgb = prepared(), prepared("rgb", logits_fn=logits)
    assert rgb.run.sets["calibration"].inputs[0].shape == (3, 32, 32)
    assert torch.allclose(rgb.run.sets["calibration"].gray, gray.run.sets["calibration"].gray, atol=1e-6)
    a, b = gray.run.evaluate(net), rgb.run.evaluate(net)
    assert seen and all(s[1] == 3 for s in seen)
    assert a["pseudo"]["t"]["dice"] is not None
    assert max_abs_diff(a["pseudo"], b["pseudo"]) < 1e-6 and max_abs_diff(a["real"], b["real"]) < 1e-6


def test_uint8_images_reach_the_model_as_float_with_their_values():
    dtypes = []

    def logits(module, x):
        dtypes.append((x.dtype, float(x.max())))
        return module(x)

    net = trained_net()
    u8 = prepared("uint8", logits_fn=logits)
    assert u8.run.sets["t"].inputs[0].dtype == torch.uint8  # cached as given: 4x less memory
    rec_u8 = u8.run.evaluate(_scaled(net))
    assert all(d == torch.float32 and mx > 1 for d, mx in dtypes)  # values unchanged: 0..255
    rec = prepared().run.evaluate(net)
    assert rec_u8["pseudo"]["t"]["dice"] == pytest.approx(rec["pseudo"]["t"]["dice"], abs=0.05)
    assert rec_u8["real"]["calibration"]["dice"] == pytest.approx(rec["real"]["calibration"]["dice"], abs=0.02)


def _scaled(net: TinyNet) -> TinyNet:
    """``net`` for inputs in 0..255 (the user's own scaling, as a logits_fn would do)."""
    out = TinyNet(scale=1 / 255)
    out.load_state_dict(net.state_dict())
    return out


def test_images_of_different_sizes_in_one_dataset():
    cb = prepared("sizes")
    cal = cb.run.sets["calibration"]
    assert {tuple(x.shape) for x in cal.inputs} == {(1, 32, 32), (1, 48, 48)}
    assert cal.gray.shape == (10, 1, 32, 32)
    batches = [b.shape for _, b in cal.batches(16)]
    assert len(batches) == 10  # sizes alternate: every batch holds one size
    rec = cb.run.evaluate(trained_net())
    assert rec["real"]["calibration"]["dice"] is not None and rec["pseudo"]["t"]["dice"] is not None


def test_items_as_tuples_or_dicts_and_targets_without_masks():
    net = trained_net()
    as_dict, as_tuple = prepared("dict"), prepared("tuple")
    a, b = as_dict.run.evaluate(net), as_tuple.run.evaluate(net)
    assert a["pseudo"] == b["pseudo"] and a["real"] == b["real"]
    cb = tiny_spe()
    ref, cal, _ = sets()
    cb.run.prepare(ref, cal, {"u": Blobs(10, seed=3, fmt="tuple", with_mask=False)})
    rec = cb.run.evaluate(net)
    assert "u" not in rec["real"] and rec["pseudo"]["u"]["dice"] is not None


def test_forward_returning_a_dict_or_a_list_and_the_logits_fn_hook():
    net = trained_net()
    recs = {}
    for output in ("tensor", "dict", "list"):
        m = TinyNet(output=output)
        m.load_state_dict(net.state_dict())
        recs[output] = prepared().run.evaluate(m)
    assert recs["dict"]["pseudo"] == recs["tensor"]["pseudo"] == recs["list"]["pseudo"]
    odd = TinyNet(output="dict")
    odd.load_state_dict(net.state_dict())
    odd.forward = lambda x: {"weird": odd.logits(x)}  # a key SPE cannot guess
    with pytest.raises(TypeError, match="pass logits_fn"):
        prepared().run.evaluate(odd)
    hooked = prepared(logits_fn=lambda module, x: module(x)["weird"]).run.evaluate(odd)
    assert hooked["pseudo"]["t"]["dice"] is not None


def test_outputs_spe_cannot_use_raise_a_clear_error():
    net = trained_net()
    with pytest.raises(ValueError, match=r"is not \[B,C,H,W\] logits"):
        prepared(logits_fn=lambda module, x: module(x)[:, 0]).run.evaluate(net)
    cb = tiny_spe(classes=[1, 2])
    cb.run.prepare(*sets(n_classes=2))
    with pytest.raises(ValueError, match="1 output channel"):
        cb.run.evaluate(net)


def test_nan_output_at_one_checkpoint_skips_that_evaluation_only(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, 5, [cb])
    with pytest.warns(UserWarning, match="evaluation at epoch 1 skipped.*NaN or inf"):
        t.fit(TinyNet(nan_epochs=(1,)), loader(ref))
    assert t.current_epoch == 5
    assert [r.epoch for r in cb.records] == [0, 2, 3, 4]
    report = json.loads((tmp_path / "spe_report.json").read_text())  # strict JSON: NaN would be refused
    assert finite_everywhere(report) and report["estimates"]["t"]["dice"]["value"] is not None

    strict = tiny_spe(reference=ref, calibration=cal, target=tgt, strict=True)
    with pytest.raises(NonFiniteOutputError):
        tiny_trainer(tmp_path, 2, [strict]).fit(TinyNet(nan_epochs=(1,)), loader(ref))


def test_every_predicted_mask_empty_gives_null_with_a_reason(tmp_path):
    ref, cal, tgt = sets()
    net = TinyNet(lr=0.0)
    with torch.no_grad():
        net.net[-1].bias.fill_(-50.0)  # predicts background everywhere
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    tiny_trainer(tmp_path, 3, [cb]).fit(net, loader(ref))
    assert len(cb.records) == 3
    rec = cb.records[-1]
    assert rec.pseudo["t"] == {"dice": None, "hd95": None} and "foreground" in rec.reasons["t"]
    est = cb.report["estimates"]["t"]["dice"]  # the calibration set has no support either: no G
    assert est["value"] is None and "no mapping G" in est["reason"] and "foreground" in est["reason"]
    assert finite_everywhere(cb.report)


def test_fewer_than_three_records_give_null_estimates_with_a_reason(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    tiny_trainer(tmp_path, 2, [cb]).fit(TinyNet(), loader(ref))
    assert len(cb.records) == 2
    for est in cb.report["estimates"]["t"].values():
        assert est["value"] is None and est["lower"] is None and "no mapping G" in est["reason"]


def test_a_target_named_calibration_or_bad_classes_are_refused():
    ref, cal, _ = sets()
    with pytest.raises(ValueError, match="may not be called"):
        tiny_spe().run.prepare(ref, cal, {"calibration": cal})
    with pytest.raises(ValueError, match="not both"):
        SPECallback(foreground_class=1, classes=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        SPECallback(classes={"a": 1, "b": 1})


class BrokenLogger(Logger):
    """A logger whose every write fails."""

    name, version = "broken", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        raise OSError("disk full")


def test_a_failing_logger_warns_and_the_report_is_still_written(tmp_path):
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path))
    t = tiny_trainer(tmp_path, 3, [cb], logger=BrokenLogger())
    with pytest.warns(UserWarning, match="logging the evaluation at epoch 0 failed.*disk full"):
        t.fit(TinyNet(), loader(ref))
    assert t.current_epoch == 3 and len(cb.records) == 3  # training and evaluations went on
    assert json.loads((tmp_path / "spe_report.json").read_text())["n_records"] == 3
    strict = tiny_spe(reference=ref, calibration=cal, target=tgt, log_dir=str(tmp_path), strict=True)
    with pytest.raises(OSError, match="disk full"):
        tiny_trainer(tmp_path, 1, [strict], logger=BrokenLogger()).fit(TinyNet(), loader(ref))


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
    other = tiny_spe(support_size=None, seed=1)  # another callback's state is not taken
    other.on_load_checkpoint(None, None, checkpoint)
    assert other.state_key not in checkpoint["callbacks"]


def test_a_failure_on_one_process_is_raised_on_every_process():
    """Shard.run gathers (result, error) from every process: all raise together, none waits forever."""
    from spe_lightning.engine.spe_engine import Shard

    boom = ValueError("NaN on rank 0")
    rank1 = Shard(rank=1, world=2, gather=lambda obj: [(None, boom), obj])
    with pytest.raises(RuntimeError, match="process 0.*NaN on rank 0"):
        rank1.run(lambda: 42)
    rank0 = Shard(rank=0, world=2, gather=lambda obj: [obj, (7, None)])
    with pytest.raises(ValueError, match="bad here"):
        rank0.run(lambda: (_ for _ in ()).throw(ValueError("bad here")))
    ok = Shard(rank=0, world=2, gather=lambda obj: [obj, (7, None)])
    assert ok.run(lambda: 6) == [6, 7]
    merged = ok.merge([{"d": torch.tensor([0.0, 2.0, 4.0])}, {"d": torch.tensor([1.0, 3.0])}], 5)
    assert merged["d"].tolist() == [0, 1, 2, 3, 4] and ok.part(5) == [0, 2, 4]


# ------------------------------------------------------------------ resume and determinism


def _fit(tmp_path, epochs: int, ckpt_dir=None, resume=None) -> SPECallback:
    pl.seed_everything(0)
    ref, cal, tgt = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target=tgt)
    callbacks = [cb]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
    t = tiny_trainer(tmp_path, epochs, callbacks, enable_checkpointing=ckpt_dir is not None)
    t.fit(TinyNet(), loader(ref), ckpt_path=resume)
    return cb


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = _fit(tmp_path / "a", 5)
    first = _fit(tmp_path / "b", 2, ckpt_dir=tmp_path / "ckpt")
    resumed = _fit(tmp_path / "c", 5, ckpt_dir=tmp_path / "ckpt2", resume=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r.epoch for r in first.records] == [0, 1]
    assert [r.epoch for r in resumed.records] == [0, 1, 2, 3, 4]  # kept, and none evaluated twice
    assert [r.pseudo for r in resumed.records[:2]] == [r.pseudo for r in first.records]
    for a, b in zip(full.records, resumed.records):
        a, b = a.to_dict(), b.to_dict()
        assert a["step"] == b["step"]
        assert max_abs_diff(a["pseudo"], b["pseudo"]) < 1e-6 and max_abs_diff(a["real"], b["real"]) < 1e-6
    ea, eb = full.report["estimates"]["t"]["dice"], resumed.report["estimates"]["t"]["dice"]
    assert ea["value"] is not None and ea["value"] == pytest.approx(eb["value"], abs=1e-6)


def test_same_seed_same_supports_references_and_estimates(tmp_path):
    ref, cal, tgt = sets()
    a, b = tiny_spe(max_references=10), tiny_spe(max_references=10)
    a.run.prepare(ref, cal, tgt)
    b.run.prepare(ref, cal, tgt)
    assert a.run.engine.ref_indices == b.run.engine.ref_indices
    masks = [m.clone() for m in a.run.sets["t"].masks]
    sa = a.run.engine.support(a.run.sets["t"], masks)
    sb = b.run.engine.support(b.run.sets["t"], masks)
    assert sa.indices == sb.indices and torch.equal(sa.labels, sb.labels)
    c = tiny_spe(max_references=10, seed=1)
    c.run.prepare(ref, cal, tgt)
    assert c.run.engine.support(c.run.sets["t"], masks).indices != sa.indices  # the seed does matter
    net = trained_net()
    assert a.run.evaluate(net) | {"seconds": 0} == b.run.evaluate(net) | {"seconds": 0}


# ------------------------------------------------------------------ memory


def test_chunk_budget_keeps_modelled_peaks_within_the_budget():
    from spe_lightning.engine.spe_engine import _ChunkBudget

    mib = 2**20
    fixed_cost, per_query = 60 * mib, 11 * mib  # about what label fusion at 256x256 costs on a GPU

    def run(limit_mib: int) -> tuple[list[int], list[float]]:
        budget = _ChunkBudget(limit_mib * mib)
        budget.fixed = 20 * mib  # the prepared support
        remaining, sizes, peaks = 1000, [], []
        while remaining:
            n = min(budget.next_chunk(remaining), remaining)
            budget.observe(n, fixed_cost + per_query * n)
            sizes.append(n)
            peaks.append(budget.fixed + fixed_cost + per_query * n)
            remaining -= n
        return sizes, peaks

    for limit_mib in (512, 2048):
        sizes, peaks = run(limit_mib)
        assert sizes[:2] == [1, 2]  # the two points of the cost model
        assert max(sizes) == (limit_mib * mib - 20 * mib - fixed_cost) // per_query  # as large as allowed
        assert max(peaks) <= limit_mib * mib
    sizes, peaks = run(128)  # two queries might not fit: one at a time, still within the budget
    assert set(sizes) == {1} and max(peaks) <= 128 * mib
    with pytest.warns(UserWarning, match="below what one query needs"):
        sizes, _ = run(64)
    assert set(sizes) == {1}
