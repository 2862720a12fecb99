"""Which records a fit continues: a checkpoint's SPE state saved under other settings, a callback reused for
another training. The callback asks; :class:`~spe_lightning.SPERun` owns the records."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl

from spe_lightning.config import SPEConfig

__all__ = ["adopt_other_settings_state", "reused_for_another_training"]


def adopt_other_settings_state(
    states: dict[str, Any], prefix: str, mine: str, key_for: Callable[[Mapping[str, Any]], str], config: SPEConfig
) -> str | None:
    """A checkpoint's one SPE state (keys starting with ``prefix``) saved under other settings than ``mine``:
    filed under ``mine`` when only ``seed`` or ``every_n_epochs`` differ (``key_for(saved config)``: the key this
    callback would have with the saved seed and schedule), so the records continue and ``load_state_dict`` warns
    with the settings. Otherwise (another reverse segmenter, metrics or support size: pseudo metrics that are not
    comparable) the warning to give; None when nothing is to be said (no other state, or several callbacks')."""
    others = [k for k in states if isinstance(k, str) and k.startswith(prefix)]
    if len(others) != 1:
        return None
    saved = states[others[0]]
    saved_cfg = (saved.get("config") or {}) if isinstance(saved, dict) else {}
    if others[0] == key_for(saved_cfg):
        states[mine] = saved
        return None
    changed = [k for k in config.changed_from(saved_cfg) if k not in ("seed", "every_n_epochs")]
    return (
        f"SPECallback: the checkpoint's SPE records were made with another reverse segmenter, metrics or support size "
        f"({', '.join(changed) or 'segmenter'}); their pseudo metrics are not comparable with this run's, so SPE "
        "starts its records over from this epoch."
    )


def reused_for_another_training(trainer: pl.Trainer, records: list[Any]) -> str | None:
    """The warning when a callback holding records is used for another training (not a resume, not the same Trainer
    going on): SPE starts over for it. None otherwise."""
    if not records or trainer.ckpt_path is not None or trainer.current_epoch > records[-1].epoch:
        return None
    return (
        f"SPECallback: this fit starts at epoch {trainer.current_epoch} while the callback holds {len(records)} "
        f"records of an earlier training (up to epoch {records[-1].epoch}); SPE starts over for this one (the "
        "earlier report files stay). Use one SPECallback per training, or resume with ckpt_path= to continue."
    )
