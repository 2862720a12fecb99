"""What the mirror consistency costs beside the model's own prediction (issue 27's per-case cost).

The per-case signal :func:`spe_lightning.percase.mirror.mirror_consistency` predicts every case once more,
mirrored. This times it against the prediction it doubles, in one process, on ``--cases`` random images of
``--size`` px through the package's ``SegmentationModel`` (weights do not change a forward's cost), so the ratio
holds whatever the machine's load; the load and thread count are recorded beside it.

    python benchmarks/mirror_cost.py --out benchmarks/results/mirror_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def measure(cases: int, size: int, repeats: int) -> dict[str, float]:
    """Seconds of the model's prediction and of the mirror consistency (best of ``repeats``) and their ratio."""
    from spe_lightning.engine.cached_set import CachedSet
    from spe_lightning.engine.predict import predict_labels
    from spe_lightning.models import SegmentationModel
    from spe_lightning.percase.mirror import mirror_consistency

    torch.manual_seed(0)
    model = SegmentationModel().eval()
    x = torch.rand(cases, 1, size, size)
    data = CachedSet("cases", list(x), None, x)

    def predict(d: CachedSet) -> tuple[list[torch.Tensor], torch.Tensor]:
        return predict_labels(model, d, "cpu")

    with torch.no_grad():
        masks, _ = predict(data)  # warm-up
        pred, mirror = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            masks, _ = predict(data)
            t1 = time.perf_counter()
            mirror_consistency(predict, data, masks)
            pred.append(t1 - t0)
            mirror.append(time.perf_counter() - t1)
    return {"prediction_s": min(pred), "mirror_s": min(mirror), "ratio": min(mirror) / min(pred)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=600)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    load_before = list(os.getloadavg())
    result = {
        "command": f"python benchmarks/mirror_cost.py --cases {a.cases} --size {a.size} --repeats {a.repeats}"
        + (f" --out {a.out}" if a.out is not None else ""),
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        **measure(a.cases, a.size, a.repeats),
        "load_after": list(os.getloadavg()),
    }
    print(json.dumps(result, indent=1))
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
