"""Pretrain the learned label propagation's encoder on synthetic tasks and write the shipped weights file.

Seeded and reproducible on one device: the same arguments give the same weights (on the CPU). By default
only procedurally generated tasks are used (``spe_lightning.reverse.synthetic_tasks``): no dataset is
read, so the weights have seen none of the datasets they are later evaluated on. Prints the wall time, a
held-out synthetic validation loss at every checkpoint, the file's SHA-256 (paste it into
``spe_lightning/reverse/pretrained.py`` as ``WEIGHTS_SHA256`` when shipping a new file).

``--dataset NAME=DIR`` (repeatable) adds the labelled **train split** of a dataset in the
``DIR/train/{images,masks}/<id>.png`` layout (masks hold class indices) as extra tasks: every class is
its own task, an episode pairs two train images that show it, and ``--dataset-share`` of every batch's
episodes come from these tasks (the rest stay synthetic). Only ``DIR/train`` is read, never a test or
extra_test split. Weights made with a dataset must be scored on other datasets only (leave one dataset
out: weights without JSRT for JSRT numbers); the shipped weights use no dataset.

    OMP_NUM_THREADS=1 python scripts/pretrain_reverse.py --steps 2500 --seed 0 --threads 1 \
        --out spe_lightning/reverse/weights/learned_propagation_v2.pt
    # leave-one-dataset-out weights for BUSI numbers (never shipped):
    OMP_NUM_THREADS=1 python scripts/pretrain_reverse.py --steps 2500 --seed 0 --threads 1 \
        --dataset jsrt=../shared/datasets/jsrt --out /tmp/lodo_busi.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spe_lightning import __version__
from spe_lightning.reverse.learned import LearnedPropagationSegmenter
from spe_lightning.reverse.pretrained import ARCHITECTURE, WEIGHTS_FILE, save_pretrained
from spe_lightning.reverse.synthetic_tasks import synthetic_episodes

#: a class must cover more than this fraction of an image (and less than MAX_FRACTION) for the image to show it
MIN_FRACTION, MAX_FRACTION = 0.005, 0.9


def dataset_tasks(spec: str, size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(task name, images [N,1,size,size] in [0, 1], binary labels [N,1,size,size]), ...]``: one task per
    class of the train split of ``NAME=DIR``, with the train images that show that class (N >= 2)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise SystemExit(f"--dataset takes NAME=DIR (e.g. jsrt=../shared/datasets/jsrt), got {spec!r}.")
    train = Path(folder) / "train"  # the train split only: test and extra_test splits are never read
    paths = sorted((train / "images").glob("*.png"))
    if not paths:
        raise SystemExit(f"--dataset {spec}: no train images in {train / 'images'} (expected <id>.png files).")
    images, masks = [], []
    for path in paths:
        mask_path = train / "masks" / path.name
        if not mask_path.is_file():
            raise SystemExit(f"--dataset {spec}: {path.name} has no mask {mask_path}.")
        images.append(np.asarray(Image.open(path).convert("L").resize((size, size), Image.BILINEAR)))
        masks.append(np.asarray(Image.open(mask_path).resize((size, size), Image.NEAREST)))
    x = torch.from_numpy(np.stack(images)).float().div(255)[:, None]
    y = torch.from_numpy(np.stack(masks).astype(np.int64))[:, None]
    tasks = []
    for c in sorted(int(v) for v in y.unique() if v != 0):
        lab = (y == c).float()
        frac = lab.mean((1, 2, 3))
        keep = (frac > MIN_FRACTION) & (frac < MAX_FRACTION)
        if int(keep.sum()) >= 2:
            tasks.append((f"{name}:{c}", x[keep], lab[keep]))
    if not tasks:
        raise SystemExit(f"--dataset {spec}: no class shows in two or more train images.")
    return tasks


def dataset_episodes(
    tasks: list[tuple[str, torch.Tensor, torch.Tensor]], batch: int, g: torch.Generator
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless episode batches ``(xq, xs, lq, ls)``: per episode a task (uniformly), then two different images."""
    while True:
        out: list[list[torch.Tensor]] = [[], [], [], []]
        for t in torch.randint(0, len(tasks), (batch,), generator=g).tolist():
            _, x, y = tasks[t]
            i = int(torch.randint(0, x.shape[0], (1,), generator=g))
            j = (i + int(torch.randint(1, x.shape[0], (1,), generator=g))) % x.shape[0]  # a different image
            for part, v in zip(out, (x[i], x[j], y[i], y[j])):
                part.append(v)
        yield tuple(torch.stack(part) for part in out)


def mixed_episodes(
    synthetic: Iterator[tuple[torch.Tensor, ...]], real: Iterator[tuple[torch.Tensor, ...]]
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of synthetic episodes followed by dataset episodes (the batch sizes of the two iterators)."""
    for a, b in zip(synthetic, real):
        yield tuple(torch.cat([u, v]) for u, v in zip(a, b))


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
    ap.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="add the labelled train split of a dataset as tasks (repeatable; DIR/train/{images,masks})",
    )
    ap.add_argument(
        "--dataset-share", type=float, default=0.25, help="share of each batch's episodes from --dataset tasks"
    )
    args = ap.parse_args(argv)
    if args.dataset and not 0 < args.dataset_share < 1:
        raise SystemExit(f"--dataset-share must be in (0, 1), got {args.dataset_share}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    seg = LearnedPropagationSegmenter(size=args.size, batch=args.batch, lr=args.lr, seed=args.seed, **ARCHITECTURE)
    enc = seg.new_encoder()
    g = torch.Generator().manual_seed(args.seed + 1)
    tasks = [t for spec in args.dataset for t in dataset_tasks(spec, args.size)]
    n_real = round(args.batch * args.dataset_share) if tasks else 0
    episodes = synthetic_episodes(args.batch - n_real, args.size, g)
    if n_real:  # dataset episodes from their own generator: the synthetic draws stay those of the same seed
        episodes = mixed_episodes(
            episodes, dataset_episodes(tasks, n_real, torch.Generator().manual_seed(args.seed + 2))
        )
    # a fixed validation set of synthetic episodes from another seed (never trained on)
    g_val = torch.Generator().manual_seed(10_000 + args.seed)
    val = list(itertools.islice(synthetic_episodes(args.batch, args.size, g_val), 8))
    recipe = {
        "generator": "spe_lightning.reverse.synthetic_tasks.synthetic_episodes"
        + (" + dataset train splits" if tasks else " (synthetic tasks only, no dataset)"),
        "datasets": [f"{name} ({x.shape[0]} train images)" for name, x, _ in tasks],
        "dataset_share": args.dataset_share if tasks else 0.0,
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
