"""UniverSeg (Butoi et al., ICCV 2023) as a reverse segmenter.

:class:`UniverSeg` is our own implementation of the UniverSeg v1 network. Its state dict matches
the official checkpoint ``universeg_v1_nf64_ss64_STA.pt`` key for key, and its outputs match the
official module's (checked against a reference case in the tests). Architecture:

* inputs are 128x128 single-channel images; every support item is ``[image, label]`` on channels;
* 4 encoder and 3 decoder *CrossBlocks* of 64 features. A CrossBlock applies a 3x3 convolution
  (no activation) to each ``[target, support_i]`` pair concatenated on channels; the new target
  is the mean of those interactions over the support axis; then a 3x3 conv + LeakyReLU(0.01) is
  applied to the target and, with separate weights, to each support item;
* 2x2 max-pooling between encoder levels (not after the last), bilinear x2 up-sampling with
  ``align_corners=True`` in the decoder, skips concatenated *after* the up-sampled features;
* a 1x1 output convolution on the target features gives the logits.

Efficiency (exact up to float rounding): because the cross convolution is linear, it is split into
a target part computed once per query and a support part computed once per support item, then
broadcast-added, so target features are never copied across the support axis and concatenations
are never materialised. A support set shared by all queries (an ``expand``-ed tensor) is convolved
once at the first level. The last decoder block only needs the target, which is linear in the
*mean* support features, so its support branch is skipped (this saves over half the FLOPs).

:class:`UniverSegSegmenter` wraps the network with the official weights; it never runs with
random weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spe_lightning.data.adapters import resize_images
from spe_lightning.reverse.base import ReverseSegmenter, downloads_allowed, register_segmenter

__all__ = ["UniverSeg", "UniverSegSegmenter", "WEIGHTS_URL", "WEIGHTS_FILENAME", "WEIGHTS_ENV_VAR", "load_universeg"]

WEIGHTS_FILENAME = "universeg_v1_nf64_ss64_STA.pt"
WEIGHTS_URL = f"https://github.com/JJGO/UniverSeg/releases/download/weights/{WEIGHTS_FILENAME}"
WEIGHTS_ENV_VAR = "SPE_UNIVERSEG_WEIGHTS"
#: the resolution UniverSeg was trained at
WORKING_SIZE = 128


# --------------------------------------------------------------------------------------------- network
class _ConvOp(nn.Module):
    """Conv2d (zero padding keeps the size) followed by an optional LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, activation: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, 0.01, inplace=True) if self.activation else x


class _Vmap(nn.Module):
    """Applies a module to every support item (``[B,S,C,H,W]`` flattened to ``[B*S,C,H,W]``).

    Kept as a module only for the official state-dict layout (``*.vmapped.*``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.vmapped = module

    def forward(self, x: Tensor) -> Tensor:
        b, s = x.shape[:2]
        y = self.vmapped(x.reshape(b * s, *x.shape[2:]))
        return y.view(b, s, *y.shape[1:])


class _CrossOp(nn.Module):
    """Holds the cross convolution over ``[target, support]`` channel pairs (no activation)."""

    def __init__(self, target_channels: int, support_channels: int, out_channels: int) -> None:
        super().__init__()
        self.target_channels = target_channels
        self.cross_conv = nn.Conv2d(target_channels + support_channels, out_channels, 3, padding=1)


def _split_conv(parts: Sequence[Tensor], weight: Tensor, offset: int) -> tuple[Tensor, int]:
    """``conv2d(cat(parts, 1), weight[:, offset:offset+C])`` without building the concatenation.

    The result is channels-last (NHWC), which convolutions run faster on, on CPU (oneDNN) and on
    CUDA in bf16; the following convs, pools and interpolations keep that layout.
    """
    out: Tensor | None = None
    for p in parts:
        c = p.shape[1]
        y = F.conv2d(p, weight[:, offset : offset + c], None, padding=1)
        out = y if out is None else out.add_(y)
        offset += c
    assert out is not None
    return out.contiguous(memory_format=torch.channels_last), offset


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _support_conv(parts: Sequence[Tensor], weight: Tensor, offset: int) -> Tensor:
    """The support half of the cross conv on ``[B,S,C,H,W]`` parts -> ``[B or 1,S,Co,H,W]``.

    A support set broadcast over the batch (stride 0, as from ``expand``) is convolved only once.
    """
    b, s = parts[0].shape[:2]
    shared = b > 1 and all(p.stride(0) == 0 for p in parts)
    flat = [p[0] if shared else _flat(p) for p in parts]
    y, _ = _split_conv(flat, weight, offset)
    return y.view(1 if shared else b, s, *y.shape[1:])


class _CrossBlock(nn.Module):
    def __init__(self, target_channels: int, support_channels: int, features: int) -> None:
        super().__init__()
        self.cross = _CrossOp(target_channels, support_channels, features)
        self.target = _Vmap(_ConvOp(features, features))
        self.support = _Vmap(_ConvOp(features, features))

    def _target_half(self, target_parts: Sequence[Tensor]) -> Tensor:
        conv = self.cross.cross_conv
        y, n = _split_conv(target_parts, conv.weight, 0)
        if n != self.cross.target_channels:
            raise RuntimeError(f"Target features have {n} channels; expected {self.cross.target_channels}.")
        assert conv.bias is not None  # the cross convolution has a bias
        return y.add_(conv.bias.view(1, -1, 1, 1).to(y.dtype))

    def forward(self, target_parts: Sequence[Tensor], support_parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``target_parts``: ``[B,C,H,W]`` tensors; ``support_parts``: ``[B,S,C,H,W]`` tensors.

        Returns the new target ``[B,F,H,W]`` and support ``[B,S,F,H,W]`` features.
        """
        t = self._target_half(target_parts)
        s = _support_conv(support_parts, self.cross.cross_conv.weight, self.cross.target_channels)
        if s.shape[0] == t.shape[0]:
            interaction = s.add_(t.unsqueeze(1))
        else:  # shared support: broadcast to [B,S,...] here, once
            interaction = s + t.unsqueeze(1)
        new_target = self.target.vmapped(_support_mean(interaction))
        new_support = self.support(interaction)
        return new_target, new_support

    def forward_target(self, target_parts: Sequence[Tensor], support_mean_parts: Sequence[Tensor]) -> Tensor:
        """Only the new target, from the *mean over the support axis* of each support part ``[B,C,H,W]``.

        Equal to ``forward(...)[0]``: the cross conv is linear, so the mean of the interactions is
        the conv of the mean support features.
        """
        t = self._target_half(target_parts)
        s, _ = _split_conv(support_mean_parts, self.cross.cross_conv.weight, self.cross.target_channels)
        return self.target.vmapped(t.add_(s))


def _support_mean(x: Tensor) -> Tensor:
    """Mean over the support axis of ``[B,S,C,H,W]`` -> ``[B,C,H,W]``.

    Reduced in ``[B,S,H,W,C]`` order: for channels-last items that is a plain contiguous
    reduction (``x.mean(1)`` on the channels-last view is ~10x slower on CPU).
    """
    return x.permute(0, 1, 3, 4, 2).mean(dim=1).permute(0, 3, 1, 2)


def _pool(x: Tensor) -> Tensor:
    if x.ndim == 5:
        y = F.max_pool2d(_flat(x), 2)
        return y.view(*x.shape[:2], *y.shape[1:])
    return F.max_pool2d(x, 2)


def _up(x: Tensor) -> Tensor:
    if x.ndim == 5:
        y = F.interpolate(_flat(x), scale_factor=2, mode="bilinear", align_corners=True)
        return y.view(*x.shape[:2], *y.shape[1:])
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class UniverSeg(nn.Module):
    """The UniverSeg v1 network (state dict compatible with the official ``universeg_v1_nf64_ss64_STA.pt``).

    ``forward(target_image [B,1,H,W], support_images [B,S,1,H,W], support_labels [B,S,1,H,W])``
    returns logits ``[B,1,H,W]``. Any support size ``S >= 1`` works; the official weights were
    trained at 128x128 (``H`` and ``W`` must be divisible by ``2 ** (len(encoder_features) - 1)``).
    A support set shared by all targets may be passed as an ``expand``-ed view (no copies): it is
    then convolved once at the first level.

    Args:
        encoder_features: features of each encoder CrossBlock.
        decoder_features: features of each decoder CrossBlock (one fewer than the encoder's).
    """

    def __init__(
        self, encoder_features: Sequence[int] = (64, 64, 64, 64), decoder_features: Sequence[int] = (64, 64, 64)
    ) -> None:
        super().__init__()
        if len(decoder_features) != len(encoder_features) - 1 or not encoder_features:
            raise ValueError("UniverSeg needs one decoder block fewer than encoder blocks.")
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        t_ch, s_ch = 1, 2  # target: image; support: image + label
        for f in encoder_features:
            self.enc_blocks.append(_CrossBlock(t_ch, s_ch, f))
            t_ch = s_ch = f
        for f, skip in zip(decoder_features, reversed(encoder_features[:-1])):
            self.dec_blocks.append(_CrossBlock(t_ch + skip, s_ch + skip, f))
            t_ch = s_ch = f
        self.out_conv = _ConvOp(t_ch, 1, kernel_size=1, activation=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weights and zero biases (a random init; load the official weights to use the model)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, target_image: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        if target_image.ndim != 4 or target_image.shape[1] != 1:
            raise ValueError(f"target_image must be [B,1,H,W]; got {tuple(target_image.shape)}.")
        b, _, h, w = target_image.shape
        if support_images.ndim != 5 or support_images.shape[0] != b or support_images.shape[2:] != (1, h, w):
            raise ValueError(
                f"support_images must be [B,S,1,H,W] = [{b},S,1,{h},{w}]; got {tuple(support_images.shape)}."
            )
        if support_labels.shape != support_images.shape:
            raise ValueError(
                f"support_labels {tuple(support_labels.shape)} must match support_images {tuple(support_images.shape)}."
            )
        if support_images.shape[1] < 1:
            raise ValueError("UniverSeg needs at least one support item.")
        factor = 2 ** (len(self.enc_blocks) - 1)
        if h % factor or w % factor:
            raise ValueError(f"Image size {h}x{w} must be divisible by {factor}.")

        t_parts: list[Tensor] = [target_image]
        s_parts: list[Tensor] = [support_images, support_labels]
        skips: list[tuple[Tensor, Tensor]] = []
        last = len(self.enc_blocks) - 1
        for i, block in enumerate(self.enc_blocks):
            t, s = block(t_parts, s_parts)
            if i < last:
                # the first skip only feeds the last decoder block, which needs just its support mean
                skips.append((t, _support_mean(s) if i == 0 else s))
                t, s = _pool(t), _pool(s)
            t_parts, s_parts = [t], [s]

        t, s = t_parts[0], s_parts[0]
        for j, block in enumerate(self.dec_blocks):
            assert isinstance(block, _CrossBlock)
            t_skip, s_skip = skips.pop()
            if j == len(self.dec_blocks) - 1:
                # mean over the support axis commutes with (linear) bilinear up-sampling
                t = block.forward_target([_up(t), t_skip], [_up(_support_mean(s)), s_skip])
            else:
                t, s = block([_up(t), t_skip], [_up(s), s_skip])
        return self.out_conv(t)


# --------------------------------------------------------------------------------------------- weights
def _unwrap_state_dict(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _unwrap_state_dict(inner)
        keys = list(obj)
        if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
            return {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_into(model: UniverSeg, obj: Any, source: str) -> None:
    """Load a (possibly wrapped) state dict into ``model``; RuntimeError naming ``source`` on any mismatch."""
    sd = _unwrap_state_dict(obj)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise RuntimeError(f"{source} is not a UniverSeg state dict (found {type(sd).__name__}).")
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or wrong:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            problems.append(f"wrong shapes: {few(wrong)}")
        raise RuntimeError(f"{source} does not match the UniverSeg v1 state dict; " + "; ".join(problems) + ".")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _load_file(model: UniverSeg, path: Path) -> None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, not a torch file, pickled objects...
        raise RuntimeError(f"Could not read UniverSeg weights from {path}: {type(err).__name__}: {err}") from err
    _load_into(model, obj, f"UniverSeg weights file {path}")


def load_universeg(weights: str | os.PathLike | None = None, download: bool | None = None) -> tuple[UniverSeg, str]:
    """The UniverSeg network with the official weights and where they came from (a path or the URL).

    Tries, in order: ``weights`` (a path), the environment variable ``SPE_UNIVERSEG_WEIGHTS``, the
    torch hub cache ``<torch.hub.get_dir()>/checkpoints/universeg_v1_nf64_ss64_STA.pt``, and a
    download from :data:`WEIGHTS_URL` (into that cache). The download is an opt-in: it runs only with
    ``download=True``, or with ``download=None`` (the default) when the environment sets
    ``SPE_DOWNLOAD=1`` (``SPE_NO_DOWNLOAD=1`` forbids it then).

    Raises:
        FileNotFoundError: ``weights`` or ``SPE_UNIVERSEG_WEIGHTS`` names a missing file, or no
            way worked (the message lists what went wrong with each).
        RuntimeError: a file was found but is not a matching UniverSeg state dict.
    """
    model = UniverSeg()
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"UniverSeg weights file {path} (passed as weights=) does not exist.")
        _load_file(model, path)
        return model, str(path)
    tried = ["argument weights=: not given"]

    env = os.environ.get(WEIGHTS_ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"UniverSeg weights file {path} (from ${WEIGHTS_ENV_VAR}) does not exist.")
        _load_file(model, path)
        return model, str(path)
    tried.append(f"environment variable {WEIGHTS_ENV_VAR}: not set")

    cache = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if cache.is_file():
        _load_file(model, cache)
        return model, str(cache)
    tried.append(f"torch hub cache {cache}: no such file")

    if download is False:
        tried.append(f"download from {WEIGHTS_URL}: skipped (download=False)")
    elif download is None and not downloads_allowed():
        why = (
            "SPE_NO_DOWNLOAD is set"
            if _env_set("SPE_NO_DOWNLOAD")
            else "downloads need SPE_DOWNLOAD=1 or download=True"
        )
        tried.append(f"download from {WEIGHTS_URL}: skipped ({why})")
    else:
        try:
            obj = torch.hub.load_state_dict_from_url(
                WEIGHTS_URL, map_location="cpu", progress=False, file_name=WEIGHTS_FILENAME, weights_only=True
            )
        except Exception as err:  # no network, HTTP error, proxy...
            tried.append(f"download from {WEIGHTS_URL}: failed ({type(err).__name__}: {err})")
        else:
            _load_into(model, obj, f"UniverSeg weights downloaded from {WEIGHTS_URL}")
            return model, str(cache) if cache.is_file() else WEIGHTS_URL

    raise FileNotFoundError(
        f"UniverSeg's official weights ({WEIGHTS_FILENAME}) were not found. Tried:\n"
        + "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
        + f"\nPass weights=PATH, set {WEIGHTS_ENV_VAR}=PATH, put the file at {cache}, or set SPE_DOWNLOAD=1 "
        "to download it."
    )


def _env_set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------- segmenter
@register_segmenter("universeg")
class UniverSegSegmenter(ReverseSegmenter):
    """UniverSeg with its official weights (see :func:`load_universeg` for where they are looked for).

    Images and labels are resized to 128x128 with (anti-aliased) bilinear interpolation; labels
    stay soft floats in [0, 1]. The logits are resized back to each query's size (bilinear) and
    passed through a sigmoid. All queries of a chunk share the support set (an ``expand``-ed view,
    no copies). Runs in bf16 autocast on CUDA and fp32 on CPU; the model moves lazily to the
    queries' device. Peak memory grows with ``chunk_size * S``: about 1 GB per query at S=64 in
    fp32 (half in bf16).

    Args:
        weights: path to ``universeg_v1_nf64_ss64_STA.pt`` (else env var, hub cache, download).
        device: where to put the model now (default: CPU, then wherever the queries are).
        chunk_size: queries segmented per step.
        download: allow the download (None: only when the environment sets ``SPE_DOWNLOAD=1``).
    """

    name = "universeg"
    #: most (query, support) pairs per forward: 64**3 * MAX_PAIRS < 2**31 (see predict)
    MAX_PAIRS = 8191

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        chunk_size: int = 16,
        download: bool | None = None,
    ) -> None:
        super().__init__(chunk_size)
        model, self.weights = load_universeg(weights, download)
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "chunk_size": self.chunk_size}

    def _model_on(self, device: torch.device) -> UniverSeg:
        if self.model.out_conv.conv.weight.device != device:
            self.model.to(device)
        return self.model

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> tuple[Tensor, Tensor]:
        size = (WORKING_SIZE, WORKING_SIZE)
        images = resize_images(support_images.float(), size, "antialiased")
        labels = resize_images(support_labels.float(), size, "antialiased").clamp_(0.0, 1.0)
        return images.unsqueeze(0), labels.unsqueeze(0)  # [1,S,1,128,128]

    def predict(self, query_images: Tensor, prepared: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = prepared
        q = query_images.shape[0]
        device = query_images.device
        model = self._model_on(device)
        target = resize_images(query_images.float(), (WORKING_SIZE, WORKING_SIZE), "antialiased")
        images, labels = images.to(device), labels.to(device)
        # PyTorch's upsampling refuses outputs of INT_MAX elements or more ([q*S, 64, 64, 64] at the
        # first decoder level), so a forward takes at most MAX_PAIRS // S queries (64 at S = 64)
        step = max(1, self.MAX_PAIRS // images.shape[1])
        parts = []
        with torch.no_grad():
            for i in range(0, q, step):
                t = target[i : i + step]
                args = (t, images.expand(t.shape[0], *images.shape[1:]), labels.expand(t.shape[0], *labels.shape[1:]))
                if device.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        parts.append(model(*args).float())
                else:
                    parts.append(model(*args).float())
        logits = torch.cat(parts)
        if tuple(logits.shape[-2:]) != tuple(query_images.shape[-2:]):
            logits = F.interpolate(logits, size=query_images.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)
