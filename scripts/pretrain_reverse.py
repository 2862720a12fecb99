"""Pretrain the learned label propagation's encoder on synthetic tasks and write the shipped weights file.

Seeded and reproducible on one device: the same arguments give the same weights (on the CPU). Only
procedurally generated tasks are used (``spe_lightning.reverse.synthetic_tasks``): no dataset is read, so
the weights have seen none of the datasets they are later evaluated on. Prints the wall time, a
held-out synthetic validation loss at every checkpoint, the file's SHA-256 (paste it into
``spe_lightning/reverse/pretrained.py`` as ``WEIGHTS_SHA256`` when shipping a new file).

    OMP_NUM_THREADS=1 python scripts/pretrain_reverse.py --steps 6000 --seed 0 \
        --out spe_lightning/reverse/weights/learned_propagation_v1.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from spe_lightning import __version__
from spe_lightning.reverse.learned import LearnedPropagationSegmenter
from spe_lightning.reverse.pretrained import ARCHITECTURE, WEIGHTS_FILE, save_pretrained
from spe_lightning.reverse.synthetic_tasks import synthetic_episodes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000, help="optimisation steps (the budget)")
    ap.add_argument("--batch", type=int, default=16, help="episodes per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine-annealed to 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="working resolution (the segmenter's default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after N steps of the --steps schedule (0: run it all); the file is then the checkpoint a "
        "full run writes at step N",
    )
    ap.add_argument("--checkpoint-every", type=int, default=500, help="write the file and validate every N steps")
    ap.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    seg = LearnedPropagationSegmenter(size=args.size, batch=args.batch, lr=args.lr, seed=args.seed, **ARCHITECTURE)
    enc = seg.new_encoder()
    g = torch.Generator().manual_seed(args.seed + 1)
    episodes = synthetic_episodes(args.batch, args.size, g)
    # a fixed validation set of synthetic episodes from another seed (never trained on)
    g_val = torch.Generator().manual_seed(10_000 + args.seed)
    val = list(itertools.islice(synthetic_episodes(args.batch, args.size, g_val), 8))
    recipe = {
        "generator": "spe_lightning.reverse.synthetic_tasks.synthetic_episodes (synthetic tasks only, no dataset)",
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "size": args.size,
        "segmenter": seg.fit_spec(),
        "package_version": __version__,
        "torch": torch.__version__,
    }
    start = time.perf_counter()
    done = 0

    def labelled_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        xq, xs, lq, ls = batch
        return xq, xs, seg.label_image(lq), seg.label_image(ls)  # labels at the propagation's resolution

    def validate() -> float:
        gv = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses = [float(seg.episode_loss(enc, labelled_batch(b), gv)) for b in val]
        return sum(losses) / len(losses)

    def checkpoint(final: bool = False) -> None:
        wall = time.perf_counter() - start
        sha = save_pretrained(args.out, enc.state_dict(), {**recipe, "steps_done": done, "wall_s": round(wall, 1)})
        print(
            json.dumps({"step": done, "wall_s": round(wall, 1), "val_loss": round(validate(), 4), "sha256": sha}),
            flush=True,
        )
        if final:
            size = args.out.stat().st_size
            print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {wall:.0f} s on {platform.machine()}, sha256 {sha}")

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done % args.checkpoint_every == 0 and done < args.steps:
            checkpoint()

    labelled = (labelled_batch(b) for b in episodes)
    if args.stop_after:  # the same schedule, cut short: the episodes run out after N batches
        labelled = itertools.islice(labelled, args.stop_after)
    seg.train_encoder(enc, labelled, args.steps, args.lr, g, progress)
    checkpoint(final=True)


if __name__ == "__main__":
    main()
