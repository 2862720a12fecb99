"""Procedurally generated segmentation tasks for pretraining the learned label propagation.

A *task* is a family of images that share a layout and an appearance: a few regions drawn from smooth
random fields, each region with its own intensity and texture, and one region (the foreground) to be
segmented. The images of a task differ by a random smooth deformation, a random affine move (small in
"aligned" tasks such as chest X-rays, large in "lesion" tasks where the object can be anywhere), an
intensity jitter, fresh texture noise, blur and a bias field. Episodes pair two images of one task, so
a network learns to recognise "the same structure" from one labelled example, which is what
:class:`~spe_lightning.reverse.learned.LearnedPropagationSegmenter` does at evaluation.

The recipe follows the idea of the synthetic tasks in UniverSeg (Butoi et al., ICCV 2023) and
Neuralizer (Czolbe & Dalca, CVPR 2023); the generator is written from scratch here. Everything is
drawn from one ``torch.Generator`` on the CPU, so a seed reproduces the tasks exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.reverse.encoder import blur

__all__ = ["synthetic_episodes", "synthetic_tasks"]


def _uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _smooth_noise(g: torch.Generator, n: int, channels: int, size: int, coarse: Tensor) -> Tensor:
    """``[n, channels, size, size]`` smooth random fields, one coarseness (grid cells per side) per sample."""
    out = torch.empty(n, channels, size, size)
    for c in coarse.unique().tolist():
        sel = (coarse == c).nonzero().flatten()
        low = torch.randn((sel.numel(), channels, int(c), int(c)), generator=g)
        out[sel] = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return out


def _warp(fields: Tensor, g: torch.Generator, deform: Tensor, move: Tensor, scale: Tensor) -> Tensor:
    """Resample ``fields [n,C,S,S]`` through a random affine move and a smooth displacement per sample.

    ``deform``: displacement amplitude (fraction of the image); ``move``: translation amplitude and
    rotation (radians x move * 2); ``scale``: log-scale amplitude.
    """
    n, _, s, _ = fields.shape
    angle = _uniform(g, -1, 1, n) * move * 2
    zoom = torch.exp(_uniform(g, -1, 1, n) * scale)
    shift = _uniform(g, -1, 1, n, 2) * move[:, None]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    flow = F.interpolate(torch.randn((n, 2, 5, 5), generator=g), size=(s, s), mode="bicubic", align_corners=False)
    grid = grid + flow.permute(0, 2, 3, 1) * deform.view(n, 1, 1, 1)
    return F.grid_sample(fields, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def synthetic_tasks(
    n_tasks: int, n_images: int, size: int, g: torch.Generator, max_regions: int = 6
) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, labels, valid)``: images in [0, 1] and binary float labels, each
    ``[n_tasks, n_images, 1, size, size]``, and ``valid [n_tasks]``, False where an image's foreground is
    (almost) empty or covers nearly everything (callers drop those tasks).

    Every task gets its own number of regions (2 .. ``max_regions``), coarseness, foreground size,
    intensities, textures, and how much its images move and deform; its images share all of that and
    differ by the per-image draws described in the module docstring.
    """
    if n_tasks < 1 or n_images < 1 or size < 8 or max_regions < 2:
        raise ValueError("Need n_tasks, n_images >= 1, size >= 8 and max_regions >= 2.")
    t, m, k = n_tasks, n_images, max_regions
    # ---- task layout: K smooth score fields; the region of a pixel is the field that is highest there
    n_reg = torch.randint(2, k + 1, (t,), generator=g)
    coarse = torch.randint(2, 7, (t,), generator=g)
    base = _smooth_noise(g, t, k, size, coarse)
    absent = torch.arange(k)[None] >= n_reg[:, None]  # unused regions never win
    base = base.masked_fill(absent[:, :, None, None], -1e4)
    base[:, 0] += _uniform(g, -0.6, 0.9, t)[:, None, None]  # foreground (region 0) size varies by task
    # a third of the tasks: the foreground is one compact blob (a lesion, an organ) instead of a field region
    blob = torch.rand(t, generator=g) < 0.35
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = _uniform(g, -0.5, 0.5, t, 2)
    radius = _uniform(g, 0.12, 0.45, t, 2)
    ell = ((yy - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2
    ell = ell + ((xx - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2
    blob_score = 4.0 * (1.0 - ell) + 0.6 * base[:, 0]  # an ellipse with a wobbly outline
    base[:, 0] = torch.where(blob[:, None, None], blob_score, base[:, 0])
    # ---- how the task's images differ: aligned tasks move little, lesion-like tasks anywhere
    move = torch.where(torch.rand(t, generator=g) < 0.5, _uniform(g, 0.0, 0.12, t), _uniform(g, 0.2, 0.6, t))
    deform = _uniform(g, 0.0, 0.08, t)
    scale = _uniform(g, 0.0, 0.3, t)
    fields = base.repeat_interleave(m, 0)  # [t*m, K, S, S]
    fields = _warp(fields, g, deform.repeat_interleave(m), move.repeat_interleave(m), scale.repeat_interleave(m))
    region = fields.argmax(1)  # [t*m, S, S]
    onehot = F.one_hot(region, k).permute(0, 3, 1, 2).float()
    labels = onehot[:, :1]
    # ---- appearance: per-region intensity (shared by the task, jittered per image) and texture
    level = _uniform(g, 0.0, 1.0, t, k).repeat_interleave(m, 0) + 0.05 * torch.randn((t * m, k), generator=g)
    amp = _uniform(g, 0.0, 0.25, t, k).repeat_interleave(m, 0)
    tex_coarse = torch.randint(4, 33, (t,), generator=g).repeat_interleave(m)
    tex = _smooth_noise(g, t * m, k, size, tex_coarse)
    img = (onehot * (level[:, :, None, None] + amp[:, :, None, None] * tex)).sum(1, keepdim=True)
    # soft edges, a smooth bias field and a global contrast, as imaging systems make them
    img = blur(img, _uniform(g, 0.0, 1.5, t).repeat_interleave(m))
    bias = _smooth_noise(g, t * m, 1, size, torch.full((t * m,), 3))
    img = img * (1 + _uniform(g, 0.0, 0.3, t).repeat_interleave(m).view(-1, 1, 1, 1) * bias)
    lo = img.amin((1, 2, 3), keepdim=True)
    hi = img.amax((1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    # an image whose foreground is (almost) empty or everything teaches nothing: its task is marked invalid
    frac = labels.mean((1, 2, 3)).view(t, m)
    valid = ((frac > 0.005) & (frac < 0.9)).all(1)
    return img.view(t, m, 1, size, size), labels.view(t, m, 1, size, size), valid


def synthetic_episodes(
    batch: int, size: int, g: torch.Generator, images_per_task: int = 6, tasks_per_draw: int = 16, reuse: int = 4
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Endless episode batches ``(query images, support images, query labels, support labels)``, each
    ``[batch, 1, size, size]``: two different images of one synthetic task per episode.

    ``tasks_per_draw`` tasks of ``images_per_task`` images are generated at a time and serve ``reuse``
    batches (generating is about as costly as a training step, so tasks are shared between a few steps).
    """
    if images_per_task < 2:
        raise ValueError(f"An episode pairs two images of a task: images_per_task must be >= 2, got {images_per_task}.")
    m = images_per_task
    while True:
        x, y, valid = synthetic_tasks(tasks_per_draw, m, size, g)
        x, y = x[valid], y[valid]
        if x.shape[0] == 0:
            continue
        for _ in range(reuse):
            t = torch.randint(0, x.shape[0], (batch,), generator=g)
            i = torch.randint(0, m, (batch,), generator=g)
            j = (i + torch.randint(1, m, (batch,), generator=g)) % m  # a different image of the same task
            yield x[t, i], x[t, j], y[t, i], y[t, j]
