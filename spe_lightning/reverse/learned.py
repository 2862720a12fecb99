"""Learned label propagation: a reverse segmenter that learns the task from the labelled references.

:meth:`LearnedPropagationSegmenter.fit` trains a small CNN encoder episodically on the references
(one support image, one query image per episode) so that soft attention from every query pixel to
the pixels of the support image reproduces the query's label from the support's label. Images are
rank-normalised and augmented in appearance (noise, gamma, blur, contrast, low resolution) during
fitting, so the features follow anatomy rather than appearance. At evaluation the encoder is frozen
and every query is segmented from **each support separately** (no fusion across supports before
scoring): a support mask's errors are copied into that pair's prediction instead of being averaged
away by the other supports. :meth:`~LearnedPropagationSegmenter.score` returns the pseudo Dice per
query (mean over supports of the pair's soft Dice); ``__call__`` returns the mean of the per-support
probabilities, for callers that want one fused map.

With ``pretrained=True`` the fit adapts pretrained weights (:mod:`spe_lightning.reverse.pretrained`) for
``adapt_steps`` steps instead of fitting ``steps`` steps from scratch.

Plain PyTorch, CPU or CUDA; deterministic for a given ``seed`` on one device.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.data.adapters import resize_images
from spe_lightning.reverse.base import ReverseSegmenter, check_inputs, register_segmenter
from spe_lightning.reverse.encoder import (
    PAIR_METRICS,
    Episodes,
    PropagationEncoder,
    augment_appearance,
    reference_episodes,
    soft_dice,
    soft_overlap,
)
from spe_lightning.reverse.label_fusion import rank_normalise
from spe_lightning.reverse.pretrained import (
    adapting_only_the_last,
    check_adapt_layers,
    check_pretrained_settings,
    load_pretrained,
    pretrained_id,
)

__all__ = ["DIRECTIONS", "LearnedPropagationSegmenter", "PropagationEncoder", "augment_appearance"]

#: what :meth:`LearnedPropagationSegmenter.score` compares: ``"reverse"`` (support labels propagated to
#: the query vs the query's labels), ``"forward"`` (query labels propagated to the support vs the
#: support's labels) or ``"both"`` (their mean)
DIRECTIONS = ("reverse", "forward", "both")


@register_segmenter("learned_propagation")
class LearnedPropagationSegmenter(ReverseSegmenter):
    """Label propagation by attention between learned features, fitted on the labelled references.

    Call :meth:`fit` once with the references (``[N,1,H,W]`` images in [0, 1], binary labels)
    before segmenting; without it, calls raise ``RuntimeError``. Then
    ``segmenter(query, support_images, support_labels)`` gives the mean over supports of the
    per-support propagated probabilities, and :meth:`score` gives the pseudo Dice per query (mean
    over supports of the per-pair soft Dice against the query labels), which SPE should prefer.

    Args:
        size: working resolution; images are resized to ``size x size``.
        downsample: stride-2 stages of the encoder; features live on a ``size / 2**downsample`` grid.
        width: encoder channels.
        dim: feature channels.
        tau: attention temperature (cosine similarities are divided by it).
        steps: optimisation steps of :meth:`fit`; ``batch`` episodes (query, support pairs) per step.
        lr: Adam learning rate.
        augment: strength of the appearance augmentation during fitting (0: none).
        coords: give the encoder the pixel coordinates.
        flip: flip both images of an episode left-right at random while fitting.
        patch_labels: propagate, for every feature cell, the ``2**downsample``-pixel label patch under it
            (label detail finer than the feature grid is copied; it raised true-mask Dice and slope
            on BUSI and JSRT) instead of one averaged label per cell.
        label_jitter: while fitting, dilate or erode both masks of an episode by the same random
            radius up to this many label pixels (0: off; it did not help on BUSI).
        max_supports: supports each query is compared with (0: all); fewer is faster.
        direction: what :meth:`score` compares, one of :data:`DIRECTIONS`.
        select: which supports a query is compared with when ``max_supports`` is below the support
            count: ``"spread"`` (an evenly spread subset rotating with the query index, so every
            support is used equally often) or ``"nearest"`` (most similar by mean feature; a few
            "hub" supports may then dominate).
        tau_eval: attention temperature at evaluation (0: ``tau``).
        pretrained: start :meth:`fit` from the shipped weights pretrained on synthetic tasks
            (:mod:`spe_lightning.reverse.pretrained`) and adapt them for ``adapt_steps`` steps at ``adapt_lr``
            instead of fitting ``steps`` steps from scratch. Needs the shipped architecture
            (``width=32, dim=16, downsample=2, coords=True``).
        adapt_steps: optimisation steps of the adaptation with ``pretrained`` (0: use the weights as they are).
        adapt_lr: Adam learning rate of the adaptation.
        adapt_layers: with ``pretrained``, only the encoder's last ``adapt_layers`` convolutions adapt and the
            earlier ones keep the pretrained weights (0: all adapt). The backward pass then stops at the first
            adapted layer, which is most of a step's cost.
        weights: with ``pretrained``, a weights file written by ``scripts/pretrain_reverse.py`` to start from
            instead of the shipped one (None: the shipped file); its header is checked, its SHA-256 keys the fit.
        seed: seed of the weight initialisation, the episode order and the augmentation.
        chunk_size: queries per step (see :class:`ReverseSegmenter`).
    """

    name = "learned_propagation"
    needs_fit = True
    supports_scoring = True
    scored_metrics = PAIR_METRICS
    # per-case RCA scores (one-image supports) ranked BUSI cases worse with it than with label fusion on the
    # calibration split (AUROC 0.825 against 0.906; docs/benchmarks_history.md, per-case quality on BUSI)
    case_segmenter = "label_fusion"

    def __init__(
        self,
        size: int = 64,
        downsample: int = 2,
        width: int = 32,
        dim: int = 16,
        tau: float = 0.05,
        steps: int = 800,
        batch: int = 16,
        lr: float = 3e-3,
        augment: float = 1.0,
        coords: bool = True,
        flip: bool = False,
        patch_labels: bool = True,
        label_jitter: int = 0,
        max_supports: int = 8,
        direction: str = "reverse",
        select: str = "spread",
        tau_eval: float = 0.0,
        pretrained: bool = False,
        adapt_steps: int = 100,
        adapt_lr: float = 3e-3,
        adapt_layers: int = 0,
        weights: str | None = None,
        seed: int = 0,
        chunk_size: int = 8,
    ) -> None:
        super().__init__(chunk_size)
        if size < 16 or downsample < 0 or size % (2**downsample):
            raise ValueError(f"size must be >= 16 and divisible by 2**downsample; got {size}, {downsample}.")
        if width < 1 or dim < 1 or tau <= 0 or steps < 0 or batch < 1 or lr <= 0 or augment < 0 or max_supports < 0:
            raise ValueError("Need width, dim, batch >= 1, tau, lr > 0 and steps, augment, max_supports >= 0.")
        self.size, self.downsample, self.width, self.dim, self.tau = size, downsample, width, dim, float(tau)
        self.steps, self.batch, self.lr, self.augment = steps, batch, float(lr), float(augment)
        self.coords, self.flip, self.max_supports, self.seed = bool(coords), bool(flip), max_supports, seed
        self.patch_labels, self.label_jitter = bool(patch_labels), int(label_jitter)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        if tau_eval < 0:
            raise ValueError(f"tau_eval must be >= 0 (0: use tau), got {tau_eval}.")
        if select not in ("spread", "nearest"):
            raise ValueError(f"select must be 'spread' or 'nearest', got {select!r}.")
        self.direction, self.tau_eval, self.select = direction, float(tau_eval), select
        arch = {"width": width, "dim": dim, "downsample": downsample, "coords": bool(coords)}
        check_pretrained_settings(pretrained, adapt_steps, adapt_lr, weights, **arch)
        self.pretrained, self.adapt_steps, self.adapt_lr = bool(pretrained), int(adapt_steps), float(adapt_lr)
        self.weights = None if weights is None else str(weights)
        self.adapt_layers = check_adapt_layers(adapt_layers, self.pretrained, downsample)
        self.encoder: PropagationEncoder | None = None
        # SPE segments the same images at every checkpoint (references, calibration and target sets; only the
        # model's masks change), so features are memoised by image content: later evaluations skip the encoder
        self._features: OrderedDict[tuple, Tensor] = OrderedDict()
        self._features_bytes = 0

    # ------------------------------------------------------------------ settings and state
    #: the constructor's settings besides ``chunk_size``, in :meth:`spec`'s order
    SETTINGS = (
        *("size", "downsample", "width", "dim", "tau", "steps", "batch", "lr", "augment", "coords", "flip"),
        *("patch_labels", "label_jitter", "max_supports", "direction", "select", "tau_eval"),
        *("pretrained", "adapt_steps", "adapt_lr", "seed"),
    )

    def spec(self) -> dict[str, Any]:
        # only when set: the specs (and fit-cache keys) of every earlier setting stay unchanged
        extra: dict[str, Any] = {} if self.weights is None else {"weights": self.weights}
        if self.adapt_layers:
            extra["adapt_layers"] = self.adapt_layers
        return {**super().spec(), **{k: getattr(self, k) for k in self.SETTINGS}, **extra}

    #: supports per set when ``support_size`` is None: every image of most sets. Each query meets only
    #: ``max_supports`` of them, so more supports cost little (their features are memoised), and with 64 of
    #: BUSI's 156 the pseudo Dice varied by 0.016 (std) between subsets of one set with no real difference
    #: (0.006 with all; benchmarks/support_noise.py)
    default_support_size = 512
    #: settings that change only how the fitted encoder is used, not the weights
    EVAL_SETTINGS = ("direction", "select", "max_supports", "tau_eval", "chunk_size")

    def fit_spec(self) -> dict[str, Any]:
        """What the fitted weights depend on; with ``pretrained`` it names the shipped file (version and
        checksum), so a fit from scratch and an adapted one never share a fit-cache entry."""
        spec = {k: v for k, v in self.spec().items() if k not in self.EVAL_SETTINGS}
        if self.pretrained:
            spec["pretrained_weights"] = pretrained_id(self.weights)
        return spec

    @property
    def grid(self) -> int:
        return self.size // 2**self.downsample

    @property
    def is_fitted(self) -> bool:
        return self.encoder is not None

    def new_encoder(self) -> PropagationEncoder:
        """A freshly initialised encoder of this segmenter's architecture (seeded by ``seed``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return PropagationEncoder(self.width, self.dim, self.downsample, self.coords)

    def state_tensors(self) -> dict[str, Tensor]:
        """The fitted weights as plain CPU tensors (empty before :meth:`fit`)."""
        if self.encoder is None:
            return {}
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`state_tensors` (an empty dict leaves the segmenter unfitted)."""
        self._forget_features()
        if not state:
            self.encoder = None
            return
        enc = self.new_encoder()
        enc.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        self.encoder = enc.eval()

    def _require_fit(self) -> PropagationEncoder:
        if self.encoder is None:
            raise RuntimeError(
                "LearnedPropagationSegmenter is not fitted: call fit(reference_images, reference_labels) "
                "(SPE does this with its references) or load_state_tensors(...) first."
            )
        return self.encoder

    # ------------------------------------------------------------------ fitting
    def normalise(self, x: Tensor) -> Tensor:
        """Images as the encoder sees them: working size, rank-normalised."""
        return rank_normalise(resize_images(x.float(), self.size, "area_down"))

    @property
    def _cell(self) -> int:
        """Label pixels per feature cell and side: ``2**downsample`` with ``patch_labels``, else 1."""
        return 2**self.downsample if self.patch_labels else 1

    def label_image(self, y: Tensor) -> Tensor:
        """Binary labels -> soft labels ``[N,1,L,L]`` at the label resolution ``L = grid * cell``."""
        return resize_images((y > 0.5).float(), self.grid * self._cell, "area_down")

    def cells(self, lab: Tensor) -> Tensor:
        """Label image ``[N,1,L,L]`` -> one label patch per feature cell, ``[N, P, cell*cell]``."""
        # non-overlapping patches: a reshape, the same order as ``F.unfold(lab, c, stride=c).transpose(1, 2)``
        # (unfold's im2col was a tenth of an evaluation's time)
        c, g, n = self._cell, self.grid, lab.shape[0]
        return lab.reshape(n, g, c, g, c).permute(0, 1, 3, 2, 4).reshape(n, g * g, c * c)

    def _labels(self, y: Tensor) -> Tensor:
        return self.cells(self.label_image(y))

    def uncells(self, cells: Tensor) -> Tensor:
        """Inverse of :meth:`cells`: ``[N, P, cell*cell]`` -> ``[N,1,L,L]``."""
        c, g, n = self._cell, self.grid, cells.shape[0]
        return cells.reshape(n, g, g, c, c).permute(0, 1, 3, 2, 4).reshape(n, 1, g * c, g * c)

    def _propagate(self, fq: Tensor, fs: Tensor, ls: Tensor) -> Tensor:
        """Pairs: query features ``[B,D,P]``, support features ``[B,D,P]``, label cells ``[B,P,C]`` -> ``[B,P,C]``."""
        att = torch.softmax(torch.einsum("bdp,bdr->bpr", fq, fs) / self.tau, dim=-1)
        return torch.bmm(att, ls)

    @property
    def fit_steps(self) -> int:
        """Optimisation steps :meth:`fit` runs: ``adapt_steps`` from the pretrained weights, else ``steps``."""
        return self.adapt_steps if self.pretrained else self.steps

    def fit(self, images: Tensor, labels: Tensor, progress: Callable[[int], Any] | None = None) -> None:
        """Train the encoder on labelled references ``[N,1,H,W]`` (``N >= 2``); deterministic for ``seed``.
        ``progress(1)`` after each of the :attr:`fit_steps` optimisation steps.

        From scratch (``pretrained=False``): ``steps`` steps at ``lr`` from a seeded initialisation. With
        ``pretrained=True``: ``adapt_steps`` steps at ``adapt_lr`` from the shipped weights. Each query
        reference is paired with a different support reference in turn (every reference serves as query and
        as support equally often); the appearance of both is augmented.
        """
        check_inputs(images, images, labels)
        n = images.shape[0]
        if n < 2:
            raise ValueError(f"fit needs at least 2 labelled references, got {n}.")
        self._forget_features()
        dev = images.device
        x = resize_images(images.float(), self.size, "area_down")
        lab = self.label_image(labels.to(dev))
        enc = self.new_encoder()
        if self.pretrained:
            enc.load_state_dict(load_pretrained(self.weights))
        g = torch.Generator().manual_seed(self.seed + 1)
        lr = self.adapt_lr if self.pretrained else self.lr
        episodes = reference_episodes(x, lab, g, self.batch, self.flip, self.label_jitter)
        with adapting_only_the_last(enc, self.adapt_layers if self.pretrained else 0):
            self.encoder = self.train_encoder(enc.to(dev), episodes, self.fit_steps, lr, g, progress)

    def episode_loss(self, enc: PropagationEncoder, batch: tuple[Tensor, ...], g: torch.Generator) -> Tensor:
        """The training loss of one episode batch ``(xq, xs, lq, ls)``: images ``[B,1,size,size]`` in [0, 1] and
        label images ``[B,1,L,L]`` (see :meth:`label_image`); the images' appearance is augmented from ``g``."""
        xq, xs, lq, ls = batch
        b = xq.shape[0]
        target, ls = self.cells(lq).flatten(1), self.cells(ls)
        both = torch.cat([xq, xs])
        if self.augment > 0:
            both = augment_appearance(both, g, self.augment)
        feats = enc(rank_normalise(both)).flatten(2)
        pred = self._propagate(feats[:b], feats[b:], ls).flatten(1).clamp(1e-4, 1 - 1e-4)
        return F.binary_cross_entropy(pred, target) + (1 - soft_dice(pred, target)).mean()

    def train_encoder(
        self,
        enc: PropagationEncoder,
        episodes: Episodes,
        steps: int,
        lr: float,
        g: torch.Generator,
        progress: Callable[[int], Any] | None = None,
    ) -> PropagationEncoder:
        """``steps`` Adam steps (cosine-annealed from ``lr``) on batches from ``episodes``; returns ``enc`` in eval
        mode. Used by :meth:`fit` (references) and by the pretraining on synthetic tasks."""
        enc.train()
        opt = torch.optim.Adam(enc.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        with torch.enable_grad():
            for _, batch in zip(range(steps), episodes):  # fewer steps if ``episodes`` runs out
                loss = self.episode_loss(enc, batch, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress(1)
        return enc.eval()

    # ------------------------------------------------------------------ evaluation
    def _pick(self, fq: Tensor, prepared: dict[str, Any]) -> Tensor:
        """Support indices ``[q, k]`` per query: all; the ``k`` nearest by mean feature (``select="nearest"``);
        or an evenly spread subset rotating with the query index, so every support is used equally often."""
        fs = prepared["feats"]
        n_query, n_sup = fq.shape[0], fs.shape[0]
        k = n_sup if self.max_supports == 0 else min(self.max_supports, n_sup)
        if self.select == "nearest" and k < n_sup:
            gq = F.normalize(fq.mean(-1), dim=1)
            return (gq @ prepared["global"].T).topk(k, dim=1).indices
        offset = prepared["offset"]
        prepared["offset"] += n_query
        base = (torch.arange(k, device=fq.device) * (n_sup / k)).long()
        rows = torch.arange(offset, offset + n_query, device=fq.device)[:, None]
        return (base[None] + rows) % n_sup

    #: the most memory the feature memo keeps (least recently used entries are dropped first)
    MEMO_BYTES = 256 * 2**20

    def _forget_features(self) -> None:
        self._features.clear()
        self._features_bytes = 0

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Features ``[N, D, P]`` of images ``[N,1,H,W]``, memoised by their exact content (see ``__init__``)."""
        enc = self._require_fit().to(images.device)
        data = images.detach().contiguous()
        digest = hashlib.blake2b(data.cpu().numpy().tobytes(), digest_size=16).digest()
        key = (digest, tuple(data.shape), str(data.dtype), str(data.device))
        hit = self._features.get(key)
        if hit is not None:
            self._features.move_to_end(key)
            return hit
        feats = enc(self.normalise(images)).flatten(2)
        size = feats.numel() * feats.element_size()
        if size <= self.MEMO_BYTES:
            self._features[key] = feats
            self._features_bytes += size
            while self._features_bytes > self.MEMO_BYTES:
                _, old = self._features.popitem(last=False)
                self._features_bytes -= old.numel() * old.element_size()
        return feats

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> Any:
        feats = torch.cat([self.encode(support_images[i : i + 64]) for i in range(0, support_images.shape[0], 64)])
        glob = F.normalize(feats.mean(-1), dim=1)
        return {"feats": feats, "global": glob, "labels": self._labels(support_labels), "offset": 0}

    def _pair_attention(self, query_images: Tensor, prepared: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Similarities ``[q, k, P, P]`` (query pixel x support pixel) for a chunk, and support indices ``[q, k]``."""
        fq = self.encode(query_images)  # [q,D,P]
        idx = self._pick(fq, prepared)
        sim = torch.einsum("qdp,qkdr->qkpr", fq, prepared["feats"][idx]).div_(self.tau_eval or self.tau)
        return sim, idx

    def _pair_predictions(self, query_images: Tensor, prepared: dict[str, Any]) -> Tensor:
        """Per-support propagated label cells for a chunk of queries: ``[q, k, P, C]``."""
        sim, idx = self._pair_attention(query_images, prepared)
        return torch.softmax(sim, dim=-1) @ prepared["labels"][idx]

    def _fuse(self, pair_predictions: Tensor, size: tuple[int, ...]) -> Tensor:
        """Per-support label cells ``[q, k, P, C]`` -> their mean as probabilities ``[q,1,*size]``."""
        prob = self.uncells(pair_predictions.mean(1))
        return F.interpolate(prob, size=size, mode="bilinear", align_corners=False)

    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        return self._fuse(self._pair_predictions(query_images, prepared), tuple(query_images.shape[-2:]))

    @torch.no_grad()
    def score(
        self, query_images: Tensor, query_labels: Tensor, support_images: Tensor, support_labels: Tensor
    ) -> Tensor:
        """Pseudo Dice per query, ``[Q]``: the mean over supports of the soft Dice between the labels
        propagated from that one support and the query's labels (on the feature grid)."""
        return self.score_metrics(query_images, query_labels, support_images, support_labels, ("dice",))["dice"]

    def score_metrics(
        self,
        query_images: Tensor,
        query_labels: Tensor,
        support_images: Tensor,
        support_labels: Tensor,
        metrics: tuple[str, ...] = PAIR_METRICS,
    ) -> dict[str, Tensor]:
        """Like :meth:`score` for each of ``metrics`` (of :data:`PAIR_METRICS`): ``{metric: [Q]}``, each the mean
        over supports of the soft metric of one support's propagated labels against the query's. With
        ``direction="forward"`` the query's labels are propagated to the support and compared with the
        support's labels (the model's mask), so precision and recall trade places to keep their meaning."""
        return self._score(query_images, query_labels, support_images, support_labels, metrics, fuse=False)[0]

    def score_and_fuse(
        self,
        query_images: Tensor,
        query_labels: Tensor,
        support_images: Tensor,
        support_labels: Tensor,
        metrics: tuple[str, ...] = PAIR_METRICS,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`score_metrics` and, from the same attention, the fused probabilities ``[Q,1,H,W]`` that
        ``segmenter(query, support_images, support_labels)`` gives: SPE needs both (pair scores for Dice and
        the overlaps, the fused map for HD95 and pixel r) and the attention is most of the cost."""
        scores, fused = self._score(query_images, query_labels, support_images, support_labels, metrics, fuse=True)
        assert fused is not None
        return scores, fused

    def _score(
        self,
        query_images: Tensor,
        query_labels: Tensor,
        support_images: Tensor,
        support_labels: Tensor,
        metrics: tuple[str, ...],
        fuse: bool,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        check_inputs(query_images, support_images, support_labels)
        if query_labels.shape != query_images.shape:
            raise ValueError(f"query_labels {tuple(query_labels.shape)} must match {tuple(query_images.shape)}.")
        unknown = [m for m in metrics if m not in PAIR_METRICS]
        if unknown:
            raise ValueError(f"score_metrics scores {PAIR_METRICS}, not {unknown}.")
        swap = {"precision": "recall", "recall": "precision"}
        dev = query_images.device
        prepared = self.prepare(support_images.to(dev).float(), (support_labels.to(dev) > 0.5).float())
        out: dict[str, list[Tensor]] = {m: [] for m in metrics}
        fused: list[Tensor] = []
        for i in range(0, query_images.shape[0], self.chunk_size):
            chunk = query_images[i : i + self.chunk_size].float()
            sim, idx = self._pair_attention(chunk, prepared)
            lq = self._labels(query_labels[i : i + self.chunk_size].to(dev))[:, None]  # [q,1,P,C]
            ls = prepared["labels"][idx]  # [q,k,P,C]
            parts: dict[str, list[Tensor]] = {m: [] for m in metrics}
            pred_q = torch.softmax(sim, dim=-1) @ ls if fuse or self.direction in ("reverse", "both") else None
            if self.direction in ("reverse", "both"):
                assert pred_q is not None
                scores = soft_overlap(pred_q.flatten(2), lq.expand_as(pred_q).flatten(2))
                for m in metrics:
                    parts[m].append(scores[m])
            if self.direction in ("forward", "both"):
                pred_s = torch.softmax(sim, dim=-2).transpose(-1, -2) @ lq
                scores = soft_overlap(pred_s.flatten(2), ls.flatten(2))
                for m in metrics:
                    parts[m].append(scores[swap.get(m, m)])
            for m in metrics:
                out[m].append(torch.stack(parts[m]).mean(0).mean(1))
            if fuse:
                assert pred_q is not None
                fused.append(self._fuse(pred_q, tuple(chunk.shape[-2:])))
        scored = {m: torch.cat(v) if v else query_images.new_zeros(0) for m, v in out.items()}
        if not fuse:
            return scored, None
        return scored, torch.cat(fused) if fused else query_images.new_zeros(0, *query_images.shape[1:])
