"""The learned propagation's network and its training-time augmentation (plain PyTorch).

:class:`PropagationEncoder` maps images to unit-norm features on a coarse grid;
:func:`augment_appearance` changes the appearance of images at random (so features follow anatomy
rather than appearance); :func:`morph` grows or shrinks soft masks; :func:`soft_dice` and
:func:`soft_overlap` score propagated labels. Shared by the fit on references
(:mod:`spe_lightning.reverse.learned`) and the pretraining on synthetic tasks
(:mod:`spe_lightning.reverse.synthetic_tasks`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PAIR_METRICS", "PropagationEncoder", "augment_appearance", "blur", "morph", "soft_dice", "soft_overlap"]


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur of ``[N,1,H,W]`` with standard deviations ``sigma [N]`` (0: none)."""
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 2r+1]
    n = x.shape[0]
    xp = F.pad(x.transpose(0, 1), (r, r, r, r), mode="replicate")  # [1,N,H+2r,W+2r]
    y = F.conv2d(xp, k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


def augment_appearance(x: Tensor, g: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random appearance changes of ``[N,1,H,W]`` images in [0, 1]: gamma, contrast, blur, low resolution, noise.

    Random numbers are drawn on the CPU from ``g`` (so the result does not depend on the device).
    """
    n, dev = x.shape[0], x.device

    def u(lo: float, hi: float, shape: tuple[int, ...] = ()) -> Tensor:
        return (lo + (hi - lo) * torch.rand((n, *shape), generator=g)).to(dev)

    s = strength
    x = x.clamp(0, 1) ** torch.exp(u(-0.7 * s, 0.7 * s)).view(-1, 1, 1, 1)  # gamma 0.5 .. 2
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * u(1 - 0.5 * s, 1 + 0.3 * s).view(-1, 1, 1, 1)).clamp(0, 1)
    sigma = torch.where(u(0, 1) < 0.4, u(0.3, 0.3 + 1.5 * s), torch.zeros(n, device=dev))
    x = blur(x, sigma)
    size = x.shape[-1]
    if float(torch.rand((), generator=g)) < 0.3 * s:  # low resolution for the whole batch
        small = max(8, int(size * float(0.35 + 0.4 * torch.rand((), generator=g))))
        x = F.interpolate(F.interpolate(x, size=(small, small), mode="area"), size=x.shape[-2:], mode="bilinear")
    noise = torch.randn(x.shape, generator=g).to(dev)
    x = x + noise * u(0.0, 0.08 * s).view(-1, 1, 1, 1)
    return x.clamp(0, 1)


class PropagationEncoder(nn.Module):
    """A small CNN: ``[N,1,size,size]`` normalised images -> unit-norm features ``[N,dim,grid,grid]``.

    Two coordinate channels are appended to the image, so position can be used where anatomy is
    aligned (JSRT) and learned to be ignored where it is not (BUSI).
    """

    def __init__(self, width: int = 24, dim: int = 16, downsample: int = 2, coords: bool = True) -> None:
        super().__init__()
        self.coords = coords
        layers: list[nn.Module] = [nn.Conv2d(1 + 2 * coords, width, 3, padding=1), nn.ReLU()]
        ch = width
        for i in range(downsample):
            out = width * 2 if i == downsample - 1 else width
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.ReLU()]
            ch = out
        for dil in (1, 2, 4):
            layers += [nn.Conv2d(ch, ch, 3, padding=dil, dilation=dil), nn.ReLU()]
        layers += [nn.Conv2d(ch, dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.coords:
            n, _, h, w = x.shape
            yy = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
            xx = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, yy, xx], 1)
        return F.normalize(self.net(x), dim=1)


def morph(lab: Tensor, radius: Tensor) -> Tensor:
    """Dilate (``radius > 0``) or erode (``< 0``) each soft mask ``[B,1,H,W]`` by its own radius (square element)."""
    out = lab.clone()
    for r in radius.unique().tolist():
        if r == 0:
            continue
        sel = radius == r
        k = 2 * abs(r) + 1
        x = lab[sel]
        out[sel] = F.max_pool2d(x, k, 1, abs(r)) if r > 0 else -F.max_pool2d(-x, k, 1, abs(r))
    return out


def soft_dice(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft Dice over the last axis (any leading shape)."""
    inter = (pred * target).sum(-1)
    return (2 * inter + eps) / (pred.sum(-1) + target.sum(-1) + eps)


#: the overlap metrics the learned propagation scores per support pair (``score_metrics``)
PAIR_METRICS = ("dice", "iou", "precision", "recall")


def soft_overlap(pred: Tensor, target: Tensor, eps: float = 1e-6) -> dict[str, Tensor]:
    """Soft Dice, IoU, precision and recall over the last axis (``eps`` as in :func:`soft_dice`)."""
    inter, p, t = (pred * target).sum(-1), pred.sum(-1), target.sum(-1)
    return {
        "dice": (2 * inter + eps) / (p + t + eps),
        "iou": (inter + eps) / (p + t - inter + eps),
        "precision": (inter + eps) / (p + eps),
        "recall": (inter + eps) / (t + eps),
    }


#: one training episode batch: query images, support images (``[B,1,size,size]``), their label images
Episodes = Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]


def reference_episodes(
    x: Tensor, lab: Tensor, g: torch.Generator, batch: int, flip: bool = False, label_jitter: int = 0
) -> Episodes:
    """Endless episode batches from references ``x`` and label images ``lab`` (drawn from ``g``): every reference
    is a query once per epoch, each with a different reference as support; ``flip``: the same random left-right
    flip for both images of an episode; ``label_jitter``: both masks grown or shrunk alike by up to that radius."""
    n, dev = x.shape[0], x.device
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch:  # queries: every reference once per epoch
            order = torch.cat([order, torch.randperm(n, generator=g)])
        qi, order = order[:batch], order[batch:]
        si = (qi + torch.randint(1, n, (batch,), generator=g)) % n  # a different reference
        qi, si = qi.to(dev), si.to(dev)
        xq, xs, lq, ls = x[qi], x[si], lab[qi], lab[si]
        if flip:
            f = (torch.rand(batch, generator=g) < 0.5).to(dev)
            f = f.view(-1, 1, 1, 1)
            xq, xs = torch.where(f, xq.flip(-1), xq), torch.where(f, xs.flip(-1), xs)
            lq, ls = torch.where(f, lq.flip(-1), lq), torch.where(f, ls.flip(-1), ls)
        if label_jitter > 0:  # grow or shrink both masks alike: the support's error must carry over
            r = torch.randint(-label_jitter, label_jitter + 1, (batch,), generator=g).to(dev)
            lq, ls = morph(lq, r), morph(ls, r)
        yield xq, xs, lq, ls
