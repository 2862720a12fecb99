"""The callback's settings: an :class:`~spe_lightning.SPEConfig` and keyword overrides, validated once."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spe_lightning.config import SPEConfig
from spe_lightning.reverse.base import ReverseSegmenter

__all__ = ["SETTING_NAMES", "find_moved_settings", "resolve_settings"]

#: the names of every setting (the fields of SPEConfig)
SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SPEConfig))


#: SPECallback's own keyword arguments (the data and hooks), which a misspelt setting may have meant
CALLBACK_ARGUMENTS = ("reference", "calibration", "target", "logits_fn", "on_alert", "log_dir")


def _unknown_settings(names: list[str]) -> str:
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, (*CALLBACK_ARGUMENTS, *SETTING_NAMES), n=1)
        if close and close[0] in CALLBACK_ARGUMENTS:  # e.g. targets= for target=: the keyword argument, not a setting
            hints.append(f"{name!r} (did you mean the argument {close[0]}=...?)")
        else:
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"SPECallback: unknown setting(s) {', '.join(hints)}; the settings are SPEConfig's fields "
        f"(docs/settings.md): {', '.join(SETTING_NAMES)}."
    )


def resolve_settings(
    config: SPEConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> tuple[SPEConfig, ReverseSegmenter | None]:
    """The callback's :class:`SPEConfig` (``config`` with ``overrides`` applied, validated by SPEConfig) and the
    ``ReverseSegmenter`` instance given as ``segmenter=`` if any (the config then names ``"auto"``, as before).

    ``config`` may also be a plain dict of settings (as :meth:`SPEConfig.to_dict` writes). Unknown names raise
    ``TypeError`` naming them (with the closest setting); bad values raise SPEConfig's ``ValueError``.
    """
    if isinstance(config, Mapping):
        config = SPEConfig.from_dict(config)
    elif config is not None and not isinstance(config, SPEConfig):
        raise TypeError(
            f"SPECallback: config must be an SPEConfig (or a dict of settings), got {type(config).__name__}; "
            "or give the settings as keyword arguments: SPECallback(every_n_epochs=2, seed=0)."
        )
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(_unknown_settings(unknown))
    changes = dict(overrides)
    segmenter = changes.get("segmenter")
    instance = None
    if isinstance(segmenter, ReverseSegmenter):
        instance, changes["segmenter"] = segmenter, "auto"  # the instance goes to the run, not into the config
    elif "segmenter" in changes and not isinstance(segmenter, str):
        raise TypeError(f"SPECallback: segmenter must be a name or a ReverseSegmenter, got {type(segmenter).__name__}.")
    for name in ("alert_below", "alert_above"):
        if isinstance(changes.get(name), Mapping):
            changes[name] = dict(changes[name])
    base = config if config is not None else SPEConfig
    resolved = base.replace(**changes) if isinstance(base, SPEConfig) else base(**changes)
    return resolved, instance


def _flat_settings_in(obj: Any) -> list[str]:
    """Setting names given directly under a SPECallback's ``init_args`` anywhere in a parsed config."""
    out: list[str] = []
    if isinstance(obj, dict):
        init_args = obj.get("init_args")
        if str(obj.get("class_path", "")).endswith("SPECallback") and isinstance(init_args, dict):
            out += [k for k in init_args if k in SETTING_NAMES]
        for v in obj.values():
            out += _flat_settings_in(v)
    elif isinstance(obj, list):
        out += [k for v in obj for k in _flat_settings_in(v)]
    return out


def find_moved_settings(args: Sequence[str]) -> str | None:
    """For LightningCLI arguments: a message naming the new place of SPE settings given the old, flat way
    (``init_args: {every_n_epochs: 2}`` in a ``--config`` file, ``--trainer.callbacks.init_args.every_n_epochs=2``
    or ``--trainer.callbacks.every_n_epochs=2``); None when there are none.

    The settings are the fields of :class:`~spe_lightning.SPEConfig`, under the callback's ``config``; without this
    check jsonargparse only says that the option "is not accepted".
    """
    found: list[tuple[str, str]] = []  # (where, name)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if not eq and flag == "--config":
            value = args[i + 1] if i + 1 < len(args) else ""
        name = flag.removeprefix("--trainer.callbacks.").removeprefix("init_args.")
        if flag.startswith("--trainer.callbacks.") and name in SETTING_NAMES:
            found.append((flag, name))
        elif flag == "--config" and value and Path(value).is_file():
            import yaml

            try:
                cfg = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # LightningCLI reports a malformed config itself
            found += [(value, n) for n in _flat_settings_in(cfg)]
    if not found:
        return None
    where = ", ".join(f"{n} ({w})" for w, n in found)
    example = found[0][1]
    return (
        f"SPECallback's settings moved under its `config` (an SPEConfig, docs/settings.md): {where}. Write "
        f"`init_args: {{config: {{{example}: ...}}}}` in YAML, or the flag "
        f"--trainer.callbacks.init_args.config.{example}=..."
    )
