"""The model's outputs as SPE reads them (engine/predict.py): RGB and uint8 inputs, dict/list outputs, logits_fn,
outputs SPE cannot use (rows of docs/reliability.md's "Bad input" table)."""

from __future__ import annotations

import pytest
import torch
from _inputs import prepared, scaled_net, sets, trained_net

from spe_lightning.testing import TinyNet, max_abs_diff, tiny_spe


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
    rec_u8 = u8.run.evaluate(scaled_net(net))
    assert all(d == torch.float32 and mx > 1 for d, mx in dtypes)  # values unchanged: 0..255
    rec = prepared().run.evaluate(net)
    assert rec_u8["pseudo"]["t"]["dice"] == pytest.approx(rec["pseudo"]["t"]["dice"], abs=0.05)
    assert rec_u8["real"]["calibration"]["dice"] == pytest.approx(rec["real"]["calibration"]["dice"], abs=0.02)


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
