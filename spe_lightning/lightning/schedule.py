"""When the callback evaluates: the planned evaluations, the advice when G would get too few, the final epoch."""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = [
    "fast_dev_run",
    "final_epoch",
    "is_due",
    "planned_evaluations",
    "schedule_advice",
    "schedule_warning",
    "skipped",
]


def planned_evaluations(max_epochs: int | None, every_n_epochs: int) -> int | None:
    """Records a fit of ``max_epochs`` will make: one per due epoch, plus the final weights if the last is not due."""
    if max_epochs is None or max_epochs < 0:
        return None  # bounded by max_steps or time: unknown here
    return max_epochs // every_n_epochs + (1 if max_epochs % every_n_epochs else 0)


def schedule_advice(max_epochs: int, every_n_epochs: int) -> str:
    """How to change the schedule so that G gets its 3 evaluations."""
    fits = [e for e in range(every_n_epochs, 0, -1) if (planned_evaluations(max_epochs, e) or 0) >= 3]
    if fits:
        return f"set every_n_epochs <= {fits[0]}"
    if every_n_epochs == 1:
        return "train for at least 3 epochs"
    return f"train for at least {3 * every_n_epochs} epochs (or 3 with every_n_epochs=1)"


def schedule_warning(max_epochs: int | None, every_n_epochs: int, recorded: int) -> str | None:
    """The warning to give before training when the schedule cannot give G the 3 evaluations it needs (else None);
    ``recorded`` records were already made (a resumed run)."""
    planned = planned_evaluations(max_epochs, every_n_epochs)
    if planned is None or planned + recorded >= 3:
        return None
    assert max_epochs is not None  # planned is None without a finite max_epochs
    return (
        f"SPECallback: every_n_epochs={every_n_epochs} with max_epochs={max_epochs} gives {planned} "
        f"evaluation(s), and G needs 3: every estimate would be null; {schedule_advice(max_epochs, every_n_epochs)}."
    )


def fast_dev_run(trainer: pl.Trainer) -> bool:
    """Whether this is a ``fast_dev_run`` (SPE needs real epochs)."""
    return bool(trainer.fast_dev_run)  # type: ignore[attr-defined]  # set by Lightning's debugging connector


def skipped(trainer: pl.Trainer) -> bool:
    """No SPE work in sanity checks and under fast_dev_run."""
    return fast_dev_run(trainer) or trainer.sanity_checking


def is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether this epoch is one the schedule evaluates (the caller checks that it is not recorded yet)."""
    return not skipped(trainer) and (trainer.current_epoch + 1) % every_n_epochs == 0


def final_epoch(trainer: pl.Trainer) -> int:
    """The epoch of the final weights (after the last epoch, ``current_epoch`` already points at the next)."""
    epoch = trainer.current_epoch
    if epoch > 0 and trainer.fit_loop.epoch_progress.current.completed >= epoch:
        epoch -= 1
    return epoch
