"""Reading datasets into memory (engine/cached_set.py): mask and item formats, sizes, inputs refused in setup
(rows of docs/reliability.md's "Bad input" table)."""

from __future__ import annotations

import pytest
import torch
from _inputs import prepared, sets, trained_net
from torch.utils.data import Dataset

from spe_lightning.engine.cached_set import cache_dataset
from spe_lightning.testing import Blobs, TinyNet, loader, tiny_spe, tiny_trainer


def test_unlabelled_reference_or_reference_without_foreground_fails_in_setup():
    ref, cal, tgt = sets()
    with pytest.raises(ValueError, match="must return masks"):
        tiny_spe().run.prepare(Blobs(4, with_mask=False), cal, tgt)
    with pytest.raises(ValueError, match="no reference mask has"):
        tiny_spe(foreground_class=7).run.prepare(ref, cal, tgt)


def test_a_dataloader_or_a_list_of_datasets_is_refused_in_setup_with_the_fix():
    ref, cal, targets = sets()
    tgt = targets["t"]
    loader = torch.utils.data.DataLoader(cal, batch_size=2)
    with pytest.raises(TypeError, match=r"SPE calibration: got a DataLoader; pass its dataset instead"):
        tiny_spe().run.prepare(ref, loader, tgt)
    with pytest.raises(TypeError, match=r"SPE t: got a DataLoader"):
        tiny_spe().run.prepare(ref, cal, {"t": torch.utils.data.DataLoader(tgt)})
    with pytest.raises(TypeError, match=r"got a list of 2 datasets; give one dataset or a dict"):
        tiny_spe().run.prepare(ref, cal, [tgt, tgt])
    with pytest.raises(TypeError, match=r"SPE reference: needs a map-style dataset"):
        tiny_spe().run.prepare(iter([ref[0]]), cal, tgt)
    tiny_spe().run.prepare(ref, cal, [tgt[i] for i in range(len(tgt))])  # a list of items is a dataset


def test_a_wrong_image_key_in_one_set_names_that_set():
    class OtherKeys(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"img": Blobs(3, seed=2)[i]["image"]}

    ref, cal, _ = sets()
    with pytest.raises(KeyError, match=r"SPE site_b item 0: Dataset item has no key 'image'.*apply to every set"):
        tiny_spe().run.prepare(ref, cal, {"site_b": OtherKeys()})
    # the calibration set read first for the working size (working_size=None) names itself too
    with pytest.raises(KeyError, match=r"SPE calibration item 0: Dataset item has no key 'image'.*apply to every"):
        tiny_spe(working_size=None).run.prepare(ref, OtherKeys(), {"site_b": OtherKeys()})


def test_dict_items_with_the_mask_under_another_key_are_told_which_label_key_to_set():
    class MaskKey(Dataset):  # MONAI-style dicts whose mask is under "mask"
        def __len__(self):
            return 3

        def __getitem__(self, i):
            it = Blobs(3, seed=1)[i]
            return {"image": it["image"], "mask": it["label"]}

    with pytest.raises(ValueError, match=r"set label_key='mask' \(SPECallback\(label_key='mask'\)"):
        cache_dataset("reference", MaskKey(), 32, require_masks=True)
    data = cache_dataset("reference", MaskKey(), 32, label_key="mask", require_masks=True)  # the fix works
    assert data.masks is not None and len(data.masks) == 3


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


def test_a_target_the_model_cannot_take_stops_the_fit_before_training_naming_the_set(tmp_path):
    class SizedNet(TinyNet):  # a model that takes 32-px images only (as a fixed-size head would)
        def forward(self, x):
            if x.shape[-1] != 32:
                raise RuntimeError(f"Sizes of tensors must match: expected 32, got {x.shape[-1]}")
            return super().forward(x)

    ref, cal, _ = sets()
    cb = tiny_spe(reference=ref, calibration=cal, target={"ok": Blobs(6, seed=4), "small": Blobs(6, (24, 24), seed=5)})
    net = SizedNet()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"cannot take the 'small' set's items \(item 0 has shape \[1, 24, 24\]\)"):
        tiny_trainer(tmp_path, 2, [cb]).fit(net, loader(ref, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # not one training step
    cb = tiny_spe(  # the 32-px sets alone train as before
        reference=ref, calibration=cal, target={"ok": Blobs(6, seed=4)}
    )
    tiny_trainer(tmp_path, 2, [cb]).fit(SizedNet(), loader(ref, 4))
    assert cb.records


def test_settings_that_give_too_few_calibration_pairs_are_warned_in_setup():
    ref, cal, tgt = sets()
    with pytest.warns(UserWarning, match=r"give 3 calibration pair\(s\), and an interval is fitted on at least 5"):
        tiny_spe(interval_subsets=1, interval_shifts=["noise"], interval_severities=(1, 3)).run.prepare(ref, cal, tgt)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_spe().run.prepare(ref, cal, tgt)  # the defaults: plenty
        tiny_spe(interval_subsets=0, interval_shifts=[]).run.prepare(ref, cal, tgt)  # none at all: chosen, not warned
