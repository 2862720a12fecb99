"""Batch adapters (data/adapters.py): a wrong key names the item's keys."""

from __future__ import annotations

import pytest
import torch

from spe_lightning.data.adapters import split_item


def test_wrong_label_key_names_the_item_keys():
    item = {"img": torch.zeros(1, 4, 4), "seg": torch.zeros(1, 4, 4)}
    with pytest.raises(KeyError, match=r"no key 'image' \(its keys: \['img', 'seg'\]\)"):
        split_item(item)
    with pytest.raises(KeyError, match=r"no key 'label' \(its keys: \['img', 'seg'\]\); set label_key="):
        split_item(item, "img", require_label=True)
    assert split_item(item, "img")[1] is None  # unlabelled data stays allowed
    assert split_item(item, "img", "seg", require_label=True)[1] is not None
