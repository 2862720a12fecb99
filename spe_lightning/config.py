"""SPEConfig: the settings of one SPE run, validated once, stored as a plain dict.

The callback, its checkpoint state (``state_dict``) and the estimator file all store
``SPEConfig.to_dict()``; :meth:`SPEConfig.from_dict` reads it back (unknown keys are refused,
so a typo in a YAML file or a dict names itself).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spe_lightning.engine.mapping import MAPPINGS
from spe_lightning.engine.metrics import PAPER_METRICS, validate_metrics
from spe_lightning.engine.shifts import SHIFT_FAMILIES
from spe_lightning.engine.spe_engine import metric_keys
from spe_lightning.engine.styled_pairs import STYLINGS
from spe_lightning.reverse.base import available_segmenters

__all__ = [
    "ACTIVATIONS",
    "ALERT_ON",
    "GROUPS",
    "MAX_AUTO_WORKING_SIZE",
    "SPEConfig",
    "setting_docs",
    "setting_groups",
    "settings_markdown",
]

ACTIVATIONS = ("auto", "sigmoid", "softmax", "none")
#: the largest working size ``working_size=None`` picks (the reverse step's cost grows with its square)
MAX_AUTO_WORKING_SIZE = 128
#: what an alert threshold is compared with: the estimate, or the pessimistic end of its interval
ALERT_ON = ("estimate", "lower")

#: the groups of settings, in the order their fields are declared: ``{key: title}`` (a field's ``metadata["group"]``)
GROUPS = {
    "run": "Schedule and output",
    "reverse": "Reverse step (pseudo metrics)",
    "estimates": "Estimates and intervals",
    "data": "Data and model output",
    "alerts": "Alerts",
}
RUN, REVERSE, ESTIMATES, DATA, ALERTS = ({"group": key} for key in GROUPS)

#: settings that change what a record or an estimate means: resuming with other values is flagged
ESTIMATION_KEYS = (
    "metrics",
    "support_size",
    "max_references",
    "min_foreground",
    "threshold",
    "mapping",
    "level",
    "anchored",
    "interval_shifts",
    "interval_subsets",
    "interval_severities",
    "size_probes",
    "styled_pairs",
    "styling",
    "case_set_uncertainty",
    "seed",
    "working_size",
    "every_n_epochs",
    "foreground_class",
    "classes",
    "max_slices",
)


def _parse_classes(classes: Sequence[int] | Mapping[str, int] | None) -> dict[str, int] | None:
    """``{name: index}`` of the ``classes`` argument (names ``class_<i>`` for a plain list)."""
    if classes is None:
        return None
    if isinstance(classes, Mapping):
        names, indices = [str(k) for k in classes], list(classes.values())
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        indices = list(classes)
        names = [f"class_{c}" for c in indices]
    else:
        raise TypeError(f"SPE: classes must be a list of class indices or a {{name: index}} dict, got {classes!r}.")
    if not indices:
        raise ValueError("SPE: classes is empty; give at least one class index (or None for binary).")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in indices):
        raise ValueError(f"SPE: class indices must be ints >= 0, got {indices!r}.")
    if len(set(indices)) != len(indices) or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"SPE: classes must have distinct indices and non-empty names, got {classes!r}.")
    return dict(zip(names, indices))


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"SPE: {name} must be an int >= {low}, got {value!r}.")


@dataclass(frozen=True)
class SPEConfig:
    """Every plain setting of an SPE run; each field's docstring says what it does (docs/settings.md lists them).

    The fields are declared group by group (:data:`GROUPS`; each field's ``metadata["group"]``); attribute
    access is flat (``config.every_n_epochs``). :class:`~spe_lightning.SPECallback` takes an ``SPEConfig`` as
    ``config`` (in a LightningCLI YAML: ``init_args: {config: {every_n_epochs: 2}}``) or the same names as
    keyword overrides.

    Frozen and validated on construction; ``classes`` is normalised to ``{name: index}`` and the
    sequences to tuples. ``working_size=None`` means the images' own size, at most
    :data:`MAX_AUTO_WORKING_SIZE` (resolved by :meth:`SPERun.prepare`). ``segmenter`` is a registered
    name or ``"auto"``; a segmenter instance is given to :class:`~spe_lightning.SPERun` separately.
    """

    every_n_epochs: int = field(default=1, metadata=RUN)
    """Evaluate every n training epochs (and once more at the final weights)."""
    verbose: bool = field(default=True, metadata=RUN)
    """Print a line per evaluation (with its time) and the table of estimates (SPECallback; SPERun alone prints
    the progress of its long steps and returns the rest)."""
    strict: bool = field(default=False, metadata=RUN)
    """Raise instead of warning and skipping when an evaluation (or writing the report) fails."""
    quality_regressor: bool = field(default=False, metadata=RUN)
    """At fit end, fit the per-case quality regressor on the references (minutes on a CPU) and save it in
    ``spe_estimator.pt``: per-case estimated Dice then come from it, and each target's Dice is also reported
    combined with SPE's."""
    segmenter: str = field(default="auto", metadata=REVERSE)
    """The reverse segmenter: ``"auto"`` is UniverSeg when its official weights are found on the machine, else
    ``learned_propagation`` (fitted on the references at the first evaluation, then cached); nothing is downloaded
    unless asked for (``SPE_DOWNLOAD=1``). Or a registered name: ``universeg``, ``learned_propagation``,
    ``label_fusion``, ``pixel_ridge``, ``pixel_knn``, ``fusion_ridge``, with options as ``name:key=value,...``
    (e.g. ``learned_propagation:pretrained=true``: start from the shipped weights, docs/pretrained_reverse.md).
    The callback also takes a ``ReverseSegmenter`` instance."""
    support_size: int | None = field(default=None, metadata=REVERSE)
    """Support images per reverse step. None: the segmenter's own count (the paper's 64 for UniverSeg and label
    fusion; 512 for ``learned_propagation``, whose cost per query does not grow with it and whose pseudo metrics are
    less noisy with more)."""
    max_references: int | None = field(default=64, metadata=REVERSE)
    """A fixed seeded subset of at most this many references (the same queries at every checkpoint); None: all.
    The reverse step's cost grows with it."""
    min_foreground: int = field(default=16, metadata=REVERSE)
    """Support masks with fewer predicted foreground pixels (at ``working_size``) are dropped, as in the paper."""
    working_size: int | None = field(default=None, metadata=REVERSE)
    """Side of the square images the reverse step works on; None: the images' own size, at most 128."""
    seed: int = field(default=0, metadata=REVERSE)
    """Seed of the reference subset and of the support order of every set."""
    memory_budget_mb: float | None = field(default=None, metadata=REVERSE)
    """On CUDA: memory (MiB) the reverse step may add; its chunk of queries is sized to it. None: no budget."""
    fit_cache: str | None = field(default="auto", metadata=REVERSE)
    """Where a learned reverse segmenter's fitted weights are kept between runs (keyed by the references' content,
    its settings, the seed and the package version): ``"auto"`` is ``$SPE_CACHE_DIR`` (empty: off) or
    ``~/.cache/spe_lightning``; a folder; None: off."""
    metrics: tuple[str, ...] = field(default=PAPER_METRICS, metadata=ESTIMATES)
    """Metrics to estimate: any of ``dice``, ``iou``, ``precision``, ``recall``, ``hd95``, ``pearson_r``."""
    mapping: str = field(default="linear", metadata=ESTIMATES)
    """G, the map from pseudo to real metric across checkpoints: ``linear`` (the paper's), ``huber`` (robust to
    outlying checkpoints) or ``isotonic`` (monotone)."""
    level: float = field(default=0.9, metadata=ESTIMATES)
    """Nominal coverage of the intervals (split-conformal on the calibration pairs, scaled per run to how their
    misses grow with the estimate's move; without pairs, G's leave-one-out residuals)."""
    anchored: bool = field(default=True, metadata=ESTIMATES)
    """Estimate a target as the calibration score moved by ``G(pseudo target) - G(pseudo calibration)``;
    False: the paper's ``G(pseudo target)`` (always kept in the report under ``paper``)."""
    interval_shifts: tuple[str, ...] = field(default=SHIFT_FAMILIES, metadata=ESTIMATES)
    """Shift families (``noise``, ``gamma``, ``contrast``, ``blur``, ``bias_field``, ``low_resolution``) applied to
    the calibration set at fit end, at ``interval_severities``, to size the intervals; ``[]`` to skip."""
    interval_subsets: int = field(default=2, metadata=ESTIMATES)
    """Random calibration subsets per target size measured at fit end for the intervals (each costs about one
    SPE evaluation)."""
    interval_severities: tuple[int, ...] = field(default=(2,), metadata=ESTIMATES)
    """Severities (1-3) of each interval shift."""
    size_probes: int = field(default=4, metadata=ESTIMATES)
    """Random calibration subsets per size (1, 2, 4, ... images) measured at fit end, so that a set smaller than the
    calibrated ones (a chunk of a few images) is anchored on the calibration pseudo metric at its size (docs/
    intervals.md); 0: off (such sets are anchored on the whole calibration set's, and with label fusion read low)."""
    styled_pairs: bool = field(default=True, metadata=ESTIMATES)
    """At fit end, also measure one pair per target from the calibration set restyled like that target (its
    intensities, low frequencies, noise and blur, from its unlabelled images; docs/other_sites.md): it joins that
    target's interval model. False: every target uses the generic pairs only (one set evaluation less per target)."""
    styling: str = field(default="v1", metadata=ESTIMATES)
    """How the styled pairs restyle the calibration set (``engine.styled_pairs.STYLINGS``): ``"v1"``, the recipe
    fixed beforehand (FDA band 0.05, the histogram of one target image, noise and blur); ``"histogram_noise_blur"``,
    the recipe chosen on development data (no FDA swap; docs/other_sites.md). The default stays ``"v1"`` until the
    recorded benchmark runs are re-run with the other."""
    case_set_uncertainty: bool = field(default=True, metadata=ESTIMATES)
    """Widen each per-case Dice interval by the set estimate's: the reach of SPE's Dice interval beyond the rows'
    mean is added to the case's own half-width in quadrature (``percase.set_agreement``), so a case's interval
    also holds when the per-case map is off for the whole site. False: the per-case map's own interval."""
    threshold: float = field(default=0.5, metadata=DATA)
    """Binarisation threshold of the model's foreground probability and of the reverse segmenter's output."""
    foreground_class: int | None = field(default=None, metadata=DATA)
    """Binary SPE on this mask class (argmax == class for a multi-channel model); None: any non-zero class."""
    # a list is accepted (and normalised to a dict): the wide annotation lets LightningCLI take ``classes: [1, 2]``
    classes: dict[str, int] | list[int] | None = field(default=None, hash=False, metadata=DATA)
    """Multi-class SPE: class indices ``[1, 2]`` or ``{"heart": 2, "lung": 1}``. Each class gets its own support
    set and reverse step; keys ``"<metric>/<class>"`` and their mean ``"<metric>"``. The model's channel ``c`` is
    class ``c``."""
    spatial_dims: int | None = field(default=None, metadata=DATA)
    """2 or 3; None: 4-D items ``[C,D,H,W]`` are volumes (handled slice by slice)."""
    max_slices: int = field(default=16, metadata=DATA)
    """Per volume, at most this many evenly spaced slices are support candidates or references."""
    image_key: str = field(default="image", metadata=DATA)
    """Key of the image in dict items."""
    label_key: str = field(default="label", metadata=DATA)
    """Key of the mask in dict items."""
    activation: str = field(default="auto", metadata=DATA)
    """``auto``: sigmoid for one output channel, softmax for several; ``sigmoid``/``softmax`` forces one;
    ``none`` when the model already outputs probabilities."""
    batch_size: int = field(default=16, metadata=DATA)
    """Batch size of SPE's own inference."""
    alert_below: dict[str, float] | None = field(default=None, hash=False, metadata=ALERTS)
    """``{metric: threshold}``: alert when a target's estimate falls below it (e.g. ``{"dice": 0.8}``)."""
    alert_above: dict[str, float] | None = field(default=None, hash=False, metadata=ALERTS)
    """``{metric: threshold}``: alert when a target's estimate rises above it (e.g. ``{"hd95": 10.0}``)."""
    alert_on: str = field(default="estimate", metadata=ALERTS)
    """``estimate`` compares the estimate with the thresholds; ``lower`` the pessimistic end of its interval
    (lower bound for ``alert_below``, upper bound for ``alert_above``): more alerts, fewer missed drops."""

    def __post_init__(self) -> None:
        self._validate_ints()
        self._validate_ranges()
        self._validate_choices()
        classes = _parse_classes(self.classes)
        if classes and self.foreground_class is not None:
            raise ValueError("SPE: give foreground_class (binary) or classes (multi-class), not both.")
        set_ = object.__setattr__  # normalised forms of a frozen dataclass
        set_(self, "classes", classes)
        set_(self, "metrics", tuple(validate_metrics(self.metrics)))
        set_(self, "interval_shifts", tuple(self.interval_shifts))
        set_(self, "interval_severities", tuple(self.interval_severities))
        set_(self, "threshold", float(self.threshold))
        set_(self, "level", float(self.level))
        set_(self, "anchored", bool(self.anchored))
        if self.memory_budget_mb is not None:
            set_(self, "memory_budget_mb", float(self.memory_budget_mb))
        self._validate_alerts()

    def _validate_ints(self) -> None:
        for name, low in (
            ("every_n_epochs", 1),
            ("min_foreground", 0),
            ("batch_size", 1),
            ("max_slices", 1),
            ("interval_subsets", 0),
            ("size_probes", 0),
        ):
            _check_int(name, getattr(self, name), low)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"SPE: seed must be an int, got {self.seed!r}.")
        if self.support_size is not None:
            _check_int("support_size", self.support_size, 1)
        if self.max_references is not None:
            _check_int("max_references", self.max_references, 1)
        if self.working_size is not None:
            _check_int("working_size", self.working_size, 16)

    def _validate_ranges(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"SPE: threshold must be in (0, 1), got {self.threshold!r}.")
        if not 0.0 < float(self.level) < 1.0:
            raise ValueError(f"SPE: level must be in (0, 1), got {self.level!r}.")
        if self.memory_budget_mb is not None and not float(self.memory_budget_mb) > 0:
            raise ValueError(f"SPE: memory_budget_mb must be None or > 0, got {self.memory_budget_mb!r}.")

    def _validate_choices(self) -> None:
        unknown = [f for f in self.interval_shifts if f not in SHIFT_FAMILIES]
        if isinstance(self.interval_shifts, str) or unknown:
            raise ValueError(f"SPE: interval_shifts must be a list of {SHIFT_FAMILIES}, got {self.interval_shifts!r}.")
        if isinstance(self.interval_severities, (str, int)) or not set(self.interval_severities) <= {1, 2, 3}:
            raise ValueError(f"SPE: interval_severities must be a list of 1, 2, 3, got {self.interval_severities!r}.")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"SPE: mapping must be one of {MAPPINGS}, got {self.mapping!r}.")
        if self.styling not in STYLINGS:
            raise ValueError(f"SPE: styling must be one of {sorted(STYLINGS)}, got {self.styling!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"SPE: activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.spatial_dims not in (None, 2, 3):
            raise ValueError(f"SPE: spatial_dims must be None, 2 or 3, got {self.spatial_dims!r}.")
        if self.fit_cache is not None and not isinstance(self.fit_cache, str):
            raise ValueError(
                f"SPE: fit_cache must be 'auto', a folder path or None (no cache), got {self.fit_cache!r}."
            )
        if not isinstance(self.segmenter, str):
            raise TypeError(
                f"SPEConfig.segmenter is a name; give a ReverseSegmenter instance to SPERun/SPECallback "
                f"instead (got {type(self.segmenter).__name__})."
            )
        name, _, options = self.segmenter.partition(":")
        if (name != "auto" or options) and name not in available_segmenters():
            raise ValueError(
                f"SPE: unknown segmenter {name!r}; use 'auto', one of {available_segmenters()} (options as "
                "'name:key=value,...') or a ReverseSegmenter instance."
            )

    def _validate_alerts(self) -> None:
        """``alert_below``/``alert_above``: ``{key: finite threshold}`` over this run's keys; ``alert_on`` a choice."""
        if self.alert_on not in ALERT_ON:
            raise ValueError(f"SPE: alert_on must be one of {ALERT_ON}, got {self.alert_on!r}.")
        keys = self.keys
        for name in ("alert_below", "alert_above"):
            given = getattr(self, name)
            if given is None:
                continue
            if not isinstance(given, Mapping):
                raise TypeError(f"SPE: {name} must be a {{metric: threshold}} dict, got {given!r}.")
            unknown = [k for k in given if k not in keys]
            if unknown:
                raise ValueError(f"SPE: {name} names {unknown}, which are not among the metrics {keys}.")
            bad = [k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v]
            if bad or any(abs(float(v)) == float("inf") for v in given.values()):
                raise ValueError(f"SPE: {name} thresholds must be finite numbers, got {dict(given)!r}.")
            object.__setattr__(self, name, {str(k): float(v) for k, v in given.items()} or None)

    # ------------------------------------------------------------------ views
    @property
    def class_names(self) -> list[str]:
        """Names of the classes of multi-class SPE (empty for binary)."""
        return list(self.classes) if isinstance(self.classes, dict) else []

    @property
    def class_indices(self) -> list[int]:
        """Indices of the classes of multi-class SPE (empty for binary)."""
        return list(self.classes.values()) if isinstance(self.classes, dict) else []

    @property
    def keys(self) -> list[str]:
        """Record/estimate keys: the metrics, or per metric its class mean then ``"<metric>/<class>"``."""
        return metric_keys(self.metrics, self.class_names or None)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~spe_lightning.engine.spe_engine.SPEEngine` for these settings."""
        return {
            "metrics": self.metrics,
            "support_size": self.support_size,
            "min_foreground": self.min_foreground,
            "threshold": self.threshold,
            "seed": self.seed,
            "class_names": self.class_names or None,
            "memory_budget_mb": self.memory_budget_mb,
        }

    def cache_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~spe_lightning.engine.cached_set.cache_dataset` for these settings."""
        if self.working_size is None:
            raise ValueError("SPEConfig.working_size is not resolved yet (SPERun.prepare resolves None).")
        return {
            "working_size": self.working_size,
            "image_key": self.image_key,
            "label_key": self.label_key,
            "foreground": self.foreground_class,
            "classes": self.class_indices or None,
            "spatial_dims": self.spatial_dims,
            "max_slices": self.max_slices,
        }

    # ------------------------------------------------------------------ plain dicts
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (lists for tuples); :meth:`from_dict` round-trips it."""
        out = dataclasses.asdict(self)
        out["metrics"], out["interval_shifts"] = list(self.metrics), list(self.interval_shifts)
        out["interval_severities"] = list(self.interval_severities)
        out["classes"] = dict(self.classes) if isinstance(self.classes, dict) and self.classes else None
        for name in ("alert_below", "alert_above"):
            out[name] = dict(getattr(self, name)) if getattr(self, name) else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SPEConfig:
        """The config of a :meth:`to_dict` dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"SPEConfig: unknown setting(s) {unknown}; known: {sorted(names)}.")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> SPEConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def changed_from(self, saved: Mapping[str, Any]) -> list[str]:
        """Estimation settings that differ from a saved dict (keys the dict lacks are not compared)."""
        mine = self.to_dict()
        return sorted(k for k in ESTIMATION_KEYS if k in saved and saved[k] != mine[k])


# ---------------------------------------------------------------------- documentation
def setting_docs() -> dict[str, str]:
    """Each :class:`SPEConfig` field's docstring (the string literal under it in the class body), in field order.

    These docstrings are the one description of the settings: the settings page of the docs is generated
    from them (:func:`settings_markdown`) and the API reference shows them.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(SPEConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return {f.name: docs[f.name] for f in dataclasses.fields(SPEConfig) if f.name in docs}


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`".replace("'", '"')


#: the command that writes docs/settings.md (printed in the page, checked by tests/integration/test_docs.py)
SETTINGS_COMMAND = "python scripts/settings_table.py > docs/settings.md"


def setting_groups(config_class: type = SPEConfig) -> dict[str, list[str]]:
    """``{group: [field names]}`` of :class:`SPEConfig` (or another dataclass), in :data:`GROUPS` and field order.

    Raises ``ValueError`` when a field has no known group or a group's fields are not declared together
    (the class body reads group by group, as the settings page does).
    """
    out: dict[str, list[str]] = {key: [] for key in GROUPS}
    seen: list[str] = []
    cls = config_class.__name__
    for f in dataclasses.fields(config_class):
        group = f.metadata.get("group")
        if group not in GROUPS:
            raise ValueError(
                f"{cls}.{f.name} has group {group!r}; give it metadata={{'group': ...}} of {list(GROUPS)}."
            )
        if seen and seen[-1] != group and group in seen:
            raise ValueError(f"{cls}.{f.name}: the fields of group {group!r} are not declared together.")
        if not seen or seen[-1] != group:
            seen.append(group)
        out[group].append(f.name)
    if seen != [g for g in GROUPS if out[g]]:
        raise ValueError(f"{cls}'s groups are declared in the order {seen}, not GROUPS' {list(GROUPS)}.")
    return out


def settings_markdown() -> str:
    """The settings page (Markdown): one section per group (:data:`GROUPS`), one row per :class:`SPEConfig`
    field with its default and docstring.

    Raises ``ValueError`` naming any field without a docstring (every setting must say what it does).
    """
    docs = setting_docs()
    fields = {f.name: f for f in dataclasses.fields(SPEConfig)}
    missing = [name for name in fields if not docs.get(name)]
    if missing:
        raise ValueError(f"SPEConfig fields without a docstring: {missing}; add one under each field in config.py.")
    defaults = SPEConfig()
    lines = [
        "# Settings",
        "",
        f"<!-- generated from SPEConfig's field docstrings (spe_lightning/config.py) by: {SETTINGS_COMMAND} -->",
        "",
        "Every setting of an SPE run, with its default. They are the fields of `SPEConfig`, which `SPERun` and",
        "`SPECallback(config=...)` take; `SPECallback(every_n_epochs=2, seed=0)` also takes them as keyword",
        "overrides. In a LightningCLI config they go under the callback's `config`:",
        "",
        "```yaml",
        "trainer:",
        "  callbacks:",
        "    - class_path: spe_lightning.SPECallback",
        "      init_args:",
        "        config: {every_n_epochs: 2, alert_below: {dice: 0.8}}",
        "```",
        "",
        "or as flags: `--trainer.callbacks.init_args.config.every_n_epochs=2`. Every value is validated when",
        "the callback is built; the report and `spe_estimator.pt` record them (`config`).",
        "",
        "The callback's other arguments (the datasets `reference`, `calibration`, `target`; `logits_fn`,",
        "`on_alert`, `log_dir`, a `ReverseSegmenter` instance as `segmenter`) are described in the",
        "[API reference](api.md).",
    ]
    for group, names in setting_groups().items():
        lines += ["", f"## {GROUPS[group]}", "", "| setting | default | meaning |", "|---|---|---|"]
        for name in names:
            text = " ".join(docs[name].split()).replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{name}` | {_default_text(getattr(defaults, name))} | {text} |")
    return "\n".join(lines) + "\n"
