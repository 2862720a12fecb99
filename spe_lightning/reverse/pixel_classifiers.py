"""Weight-free reverse segmenters that classify pixels from a deterministic filter bank.

Both learn from the support's pixels only (no weights, no randomness that varies between calls):

* ``pixel_knn``: every query pixel takes the label of its nearest support pixel(s) in feature
  space (multi-scale intensity, gradient, local statistics, position), searched over a fixed,
  seeded sample of support pixels from *all* supports (a global, position-aware search: no
  registration needed, so it works for lesions anywhere in the image). With ``k = 1`` each query
  pixel copies one support's labelling, so the support masks' errors (boundary offsets, holes,
  blobs) reappear in the output in proportion to how often they occur instead of being voted
  away: the pseudo Dice follows the support Dice with a steep slope.
* ``pixel_ridge``: a closed-form ridge classifier on the same features with their pairwise
  products, trained on all support pixels: smooth, fast, but it averages the supports' errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.data.adapters import resize_images
from spe_lightning.reverse.base import ReverseSegmenter, register_segmenter
from spe_lightning.reverse.label_fusion import normalise_images

__all__ = ["filter_bank", "PixelKNNSegmenter", "PixelRidgeSegmenter"]


def _gauss_kernel(sigma: float, device: torch.device) -> Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[N,1,H,W]`` with reflect padding."""
    if sigma <= 0:
        return x
    k = _gauss_kernel(sigma, x.device)
    r = k.numel() // 2
    r_h, r_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    k_h, k_w = k[r - r_h : r + r_h + 1], k[r - r_w : r + r_w + 1]
    x = F.conv2d(F.pad(x, (0, 0, r_h, r_h), mode="reflect"), (k_h / k_h.sum()).view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (r_w, r_w, 0, 0), mode="reflect"), (k_w / k_w.sum()).view(1, 1, 1, -1))


def filter_bank(x: Tensor, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)) -> Tensor:
    """Deterministic features ``[N,F,H,W]`` of normalised images ``[N,1,H,W]`` (position excluded).

    Intensity and Gaussian blurs at ``sigmas``; gradient magnitude and local standard deviation
    at the two smallest and two middle scales; differences of Gaussians between scales.
    """
    feats = [x]
    blurs = [_blur(x, s) for s in sigmas]
    feats += blurs
    sq = x * x
    for s, b in zip(sigmas[:3], blurs[:3]):
        gy = F.pad(b[..., 2:, :] - b[..., :-2, :], (0, 0, 1, 1), mode="replicate") / 2
        gx = F.pad(b[..., :, 2:] - b[..., :, :-2], (1, 1, 0, 0), mode="replicate") / 2
        feats.append(torch.sqrt(gy * gy + gx * gx + 1e-8) * s)
        feats.append(torch.sqrt((_blur(sq, s) - b * b).clamp_min(0) + 1e-8))
    for a, b in zip(blurs[:-1], blurs[1:]):
        feats.append(a - b)
    return torch.cat(feats, 1)


def _positions(n: int, size: int, device: torch.device) -> Tensor:
    t = torch.linspace(-1.0, 1.0, size, device=device)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([yy, xx])[None].expand(n, 2, size, size)


class _FeatureSegmenter(ReverseSegmenter):
    """Shared plumbing: working size, feature extraction, standardisation by the support's statistics."""

    def __init__(self, size: int, pos_weight: float, chunk_size: int) -> None:
        super().__init__(chunk_size)
        if size < 8 or pos_weight < 0:
            raise ValueError("Need size >= 8 and pos_weight >= 0.")
        self.size, self.pos_weight = size, pos_weight

    def features(self, images: Tensor) -> Tensor:
        x = normalise_images(resize_images(images, self.size, "area_down"))
        f = filter_bank(x)
        return torch.cat([f, _positions(x.shape[0], self.size, x.device)], 1)

    def standardise(self, f: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        mean, std = stats
        z = (f - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        z[:, -2:] = f[:, -2:] * self.pos_weight  # positions keep their geometry, scaled by pos_weight
        return z

    @staticmethod
    def stats(f: Tensor) -> tuple[Tensor, Tensor]:
        flat = f.transpose(0, 1).flatten(1)
        return flat.mean(1), flat.std(1).clamp_min(1e-6)


@register_segmenter("pixel_knn")
class PixelKNNSegmenter(_FeatureSegmenter):
    """Nearest-neighbour pixel classification over a seeded sample of support pixels.

    Args:
        size: working resolution of the features (pixels per side).
        stride: query pixels are classified on a grid of this stride at the working size and
            the label map is bilinearly upsampled (2: a 32 x 32 grid at ``size`` 64).
        k: neighbours; the probability is their mean label (``k = 1`` copies one support pixel's label).
        n_samples: support pixels kept (drawn uniformly, with a fixed seed, from all supports).
        pos_weight: weight of the (y, x) position features relative to the standardised filters.
        seed: seed of the support-pixel sample.
        chunk_size: queries per step.
    """

    name = "pixel_knn"

    def __init__(
        self,
        size: int = 64,
        stride: int = 2,
        k: int = 1,
        n_samples: int = 16384,
        pos_weight: float = 2.0,
        seed: int = 0,
        chunk_size: int = 16,
    ) -> None:
        super().__init__(size, pos_weight, chunk_size)
        if stride < 1 or k < 1 or n_samples < 1:
            raise ValueError("Need stride >= 1, k >= 1 and n_samples >= 1.")
        self.stride, self.k, self.n_samples, self.seed = stride, k, n_samples, seed

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            "size": self.size,
            "stride": self.stride,
            "k": self.k,
            "n_samples": self.n_samples,
            "pos_weight": self.pos_weight,
            "seed": self.seed,
        }

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> Any:
        f = self.features(support_images)
        stats = self.stats(f)
        z = self.standardise(f, stats).permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        lab = (resize_images(support_labels, self.size, "area_down") > 0.5).float().flatten()
        g = torch.Generator().manual_seed(self.seed)
        n = z.shape[0]
        if n > self.n_samples:
            keep = torch.randperm(n, generator=g)[: self.n_samples].to(z.device)
            z, lab = z[keep], lab[keep]
        return {"stats": stats, "z": z.contiguous(), "sq": (z * z).sum(1), "lab": lab}

    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        nq = query_images.shape[0]
        f = self.standardise(self.features(query_images), prepared["stats"])
        f = f[..., :: self.stride, :: self.stride]
        gh, gw = f.shape[-2:]
        zq = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        zs, sq, lab = prepared["z"], prepared["sq"], prepared["lab"]
        k = min(self.k, zs.shape[0])
        out = []
        rows = max(1, (1 << 25) // zs.shape[0])  # bound the distance block to ~128 MB
        for i in range(0, zq.shape[0], rows):
            a = zq[i : i + rows]
            d = sq[None, :] - 2.0 * (a @ zs.T)  # |a|^2 is constant per row: irrelevant for the ranking
            if k == 1:
                out.append(lab[d.argmin(1)])
            else:
                out.append(lab[d.topk(k, dim=1, largest=False).indices].mean(1))
        prob = torch.cat(out).view(nq, 1, gh, gw)
        return F.interpolate(prob, size=tuple(query_images.shape[-2:]), mode="bilinear", align_corners=False)


@register_segmenter("pixel_ridge")
class PixelRidgeSegmenter(_FeatureSegmenter):
    """Closed-form ridge classifier on the filter bank and its pairwise products.

    Args:
        size: working resolution of the features.
        alpha: ridge penalty (relative to the number of pixels).
        pos_weight: scale of the position features.
        chunk_size: queries per step.
    """

    name = "pixel_ridge"

    def __init__(
        self,
        size: int = 64,
        alpha: float = 1e-3,
        pos_weight: float = 1.0,
        fit_stride: int = 2,
        calibrate: bool = True,
        chunk_size: int = 32,
    ) -> None:
        super().__init__(size, pos_weight, chunk_size)
        self.alpha, self.fit_stride, self.calibrate = alpha, fit_stride, calibrate

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            "size": self.size,
            "alpha": self.alpha,
            "pos_weight": self.pos_weight,
            "fit_stride": self.fit_stride,
            "calibrate": self.calibrate,
        }

    @staticmethod
    def _design(z: Tensor) -> Tensor:
        n, d = z.shape
        iu = torch.triu_indices(d, d, device=z.device)
        quad = z[:, iu[0]] * z[:, iu[1]]
        return torch.cat([torch.ones(n, 1, device=z.device), z, quad], 1)

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> Any:
        f = self.features(support_images)
        stats = self.stats(f)
        st = self.fit_stride
        z_all = self.standardise(f, stats)[..., ::st, ::st]
        n, c = z_all.shape[:2]
        z = z_all.permute(0, 2, 3, 1).reshape(-1, c)
        y = (resize_images(support_labels, self.size, "area_down") > 0.5).float()[..., ::st, ::st].reshape(n, -1)
        x = self._design(z).double()
        a = x.T @ x
        a += self.alpha * x.shape[0] * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        w = torch.linalg.solve(a, x.T @ y.flatten().double()).float()
        shift = 0.0
        if self.calibrate:
            # the regression shrinks towards the background; pick the threshold with the best mean
            # Dice on the support itself and move it to 0.5 (this also mirrors a biased labelling)
            score = (x.float() @ w).view(n, -1)
            best = -1.0
            for t in torch.linspace(0.1, 0.6, 26).tolist():
                pred = (score > t).float()
                dsc = (2 * (pred * y).sum(1) + 1e-6) / (pred.sum(1) + y.sum(1) + 1e-6)
                if float(dsc.mean()) > best:
                    best, shift = float(dsc.mean()), 0.5 - t
        return {"stats": stats, "w": w, "shift": shift}

    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        nq = query_images.shape[0]
        f = self.standardise(self.features(query_images), prepared["stats"])
        z = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        prob = (self._design(z) @ prepared["w"] + prepared["shift"]).view(nq, 1, self.size, self.size)
        return F.interpolate(prob, size=tuple(query_images.shape[-2:]), mode="bilinear", align_corners=False)
