"""The learned reverse step's adaptation with the one-pass rank normalisation against the two binary searches it
replaced: CPU seconds of a 100-step pretrained adaptation on 172 random 128-px references (the JSRT config's
size; the cost does not depend on the pixels), each version twice, interleaved, 1 thread; and whether both give
the same fitted weights. CPU time, not wall time, so that a shared machine's load moves it less.

    python benchmarks/rank_normalise_speed.py
"""

from __future__ import annotations

import os
import time

import torch

import spe_lightning.reverse.learned as learned
from spe_lightning.reverse import make_segmenter


def two_searches(x: torch.Tensor) -> torch.Tensor:
    """The rank normalisation before the one-pass version (two binary searches per pixel)."""
    flat = x.flatten(1).contiguous()
    srt = flat.sort(dim=1).values
    lo = torch.searchsorted(srt, flat, side="left")
    hi = torch.searchsorted(srt, flat, side="right")
    q = (lo + hi).float() / (2.0 * flat.shape[1])
    return ((q - 0.5) * 12**0.5).view_as(x)


def main() -> None:
    torch.set_num_threads(1)
    one_pass = learned.rank_normalise
    g = torch.Generator().manual_seed(0)
    images = torch.rand(172, 1, 128, 128, generator=g)
    labels = (torch.rand(172, 1, 128, 128, generator=g) > 0.5).float()
    seconds: dict[str, list[float]] = {"two searches": [], "one pass": []}
    weights = {}
    load = os.getloadavg()
    for name, fn in [("two searches", two_searches), ("one pass", one_pass)] * 2:
        learned.rank_normalise = fn  # what fit's episodes call
        seg = make_segmenter("learned_propagation", pretrained=True, adapt_steps=100)
        start = time.process_time()
        seg.fit(images, labels)
        seconds[name].append(round(time.process_time() - start, 2))
        weights[name] = seg.state_tensors()
    learned.rank_normalise = one_pass
    same = all(torch.equal(weights["two searches"][k], weights["one pass"][k]) for k in weights["one pass"])
    ratio = sum(seconds["one pass"]) / sum(seconds["two searches"])
    print(f"CPU s per 100-step adaptation: {seconds}; ratio one pass / two searches {ratio:.2f}")
    print(f"same fitted weights: {same}; load average {load} before, {os.getloadavg()} after")


if __name__ == "__main__":
    main()
