"""The engine is plain PyTorch: usable, and importable, without Lightning."""

import subprocess
import sys

import torch

from spe_lightning.data import SyntheticShapesDataset
from spe_lightning.engine import PAPER_METRICS, SPEEngine, cache_dataset, fit_and_estimate
from spe_lightning.reverse import make_segmenter


def test_engine_does_not_import_lightning():
    code = (
        "import sys, spe_lightning.engine, spe_lightning.reverse; "
        "print(any(m.startswith('lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_engine_without_a_trainer():
    ref = cache_dataset("reference", SyntheticShapesDataset(24, 48, seed=1), 48, require_masks=True)
    cal = cache_dataset("calibration", SyntheticShapesDataset(12, 48, seed=2), 48)
    engine = SPEEngine(make_segmenter("label_fusion"), ref, PAPER_METRICS, support_size=8, min_foreground=4)
    records = []
    for shrink in (0, 1, 2):  # predictions that get worse: masks eroded by `shrink` pixels
        masks = [
            (-torch.nn.functional.max_pool2d(-m[None].float(), 2 * shrink + 1, 1, shrink))[0] > 0.5 for m in cal.masks
        ]
        conf = torch.ones(len(cal))
        rec = engine.evaluate({"calibration": (cal, masks, conf), "copy": (cal, masks, conf)})
        records.append(rec)
    dice = [r["real"]["calibration"]["dice"] for r in records]
    pseudo = [r["pseudo"]["calibration"]["dice"] for r in records]
    assert dice == sorted(dice, reverse=True) and dice[0] == 1.0
    assert pseudo[0] > pseudo[-1]
    est = fit_and_estimate(records, ["copy"], ["dice"])
    # the "copy" target is the calibration set itself: G must give back its real Dice
    assert abs(est["estimates"]["copy"]["dice"]["value"] - dice[-1]) < 0.1


def test_no_usable_support_gives_null_with_a_reason():
    ref = cache_dataset("reference", SyntheticShapesDataset(8, 32, seed=1), 32, require_masks=True)
    tgt = cache_dataset("site_b", SyntheticShapesDataset(6, 32, seed=3), 32)
    engine = SPEEngine(make_segmenter("label_fusion"), ref, ("dice",), support_size=4)
    empty = [torch.zeros_like(m) for m in tgt.masks]
    res = engine.pseudo(tgt, empty)
    assert res["values"] == {"dice": None} and res["n_support"] == 0 and "foreground" in res["reason"]


def test_a_pair_scoring_segmenter_gives_the_metrics_it_scores():
    """Metrics a segmenter scores per support pair come from ``score_metrics``; the rest from its fused map."""
    from spe_lightning.reverse.label_fusion import LabelFusionSegmenter

    class PairScoring(LabelFusionSegmenter):
        supports_scoring = True
        scored_metrics = ("dice", "iou")

        def score_metrics(self, query_images, query_labels, support_images, support_labels, metrics):
            return {m: torch.full((query_images.shape[0],), 0.25 if m == "dice" else 0.125) for m in metrics}

    ref = cache_dataset("reference", SyntheticShapesDataset(12, 32, seed=1), 32, require_masks=True)
    cal = cache_dataset("calibration", SyntheticShapesDataset(8, 32, seed=2), 32)
    sets = {"calibration": (cal, list(cal.masks), torch.ones(len(cal)))}
    metrics = ("dice", "iou", "precision")
    scored = SPEEngine(PairScoring(), ref, metrics, support_size=4, min_foreground=4).evaluate(sets)
    fused = SPEEngine(LabelFusionSegmenter(), ref, metrics, support_size=4, min_foreground=4).evaluate(sets)
    assert scored["pseudo"]["calibration"]["dice"] == 0.25 and scored["pseudo"]["calibration"]["iou"] == 0.125
    assert scored["pseudo"]["calibration"]["precision"] == fused["pseudo"]["calibration"]["precision"]


def test_scoring_and_fusing_in_one_pass_gives_the_numbers_of_two_passes(monkeypatch):
    """The learned segmenter's ``score_and_fuse`` computes the attention once for the pair scores and the fused
    map; the engine's numbers must equal those of ``score_metrics`` plus ``predict`` called separately."""
    from spe_lightning.reverse.learned import LearnedPropagationSegmenter

    ref = cache_dataset("reference", SyntheticShapesDataset(12, 32, seed=1), 32, require_masks=True)
    cal = cache_dataset("calibration", SyntheticShapesDataset(8, 32, seed=2), 32)
    noisy = [torch.roll(m, 3, dims=-1) for m in cal.masks]
    sets = {"calibration": (cal, noisy, torch.ones(len(cal)))}
    seg = LearnedPropagationSegmenter(size=32, downsample=1, width=8, batch=4, max_supports=4, steps=10, chunk_size=5)
    seg.fit(ref.gray, torch.stack(ref.masks).float())
    one = SPEEngine(seg, ref, PAPER_METRICS, support_size=6, min_foreground=4).evaluate(sets)
    monkeypatch.delattr(LearnedPropagationSegmenter, "score_and_fuse")
    two = SPEEngine(seg, ref, PAPER_METRICS, support_size=6, min_foreground=4).evaluate(sets)
    assert set(one["pseudo"]["calibration"]) == set(PAPER_METRICS)
    for m in PAPER_METRICS:
        assert one["pseudo"]["calibration"][m] == two["pseudo"]["calibration"][m], m


def test_support_size_none_takes_the_segmenters_own():
    ref = cache_dataset("reference", SyntheticShapesDataset(8, 32, seed=1), 32, require_masks=True)
    data = cache_dataset("site_b", SyntheticShapesDataset(80, 32, seed=3), 32)
    fusion = SPEEngine(make_segmenter("label_fusion"), ref, ("dice",), min_foreground=1)
    learned = SPEEngine(make_segmenter("learned_propagation"), ref, ("dice",), min_foreground=1)
    assert (fusion.support_size, learned.support_size) == (64, 512)  # the paper's 64; every image of most sets
    # the learned step is given every usable image of an 80-image set, label fusion 64 of them
    assert len(learned.support(data, data.masks).indices) == 80
    assert len(fusion.support(data, data.masks).indices) == 64
    assert SPEEngine(make_segmenter("learned_propagation"), ref, ("dice",), support_size=10).support_size == 10
