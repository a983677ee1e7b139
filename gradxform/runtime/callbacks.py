"""Hooks into the training loop: how the runtime reports (the CLI's progress bar is one) and how a
callback may change the model while it trains (growth)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import Trainer


class Callback:
    """Hooks into :meth:`Trainer.fit`; every method is optional. The runtime prints nothing itself:
    the CLI's reporter (a progress bar, a line per epoch) and the tests' probes are callbacks."""

    def on_resume(self, trainer: Trainer) -> None:
        """Training continues from the checkpoint of epoch ``trainer.epoch``."""

    def on_epoch_start(self, trainer: Trainer, ticks: int) -> None:
        """Epoch ``trainer.epoch + 1`` starts; its schedule has ``ticks`` ticks in all."""

    def on_tick(self, trainer: Trainer, tick: int) -> None:
        """A tick of the current epoch's schedule is done (counted from 0 within the epoch)."""

    def on_save(self, trainer: Trainer) -> None:
        """This process's stage files of epoch ``trainer.epoch`` are written; the epoch is not yet committed."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """The epoch's metrics (the same record on every rank)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Training is complete: ``trainer.history`` holds every epoch's record."""

    # -- callbacks that change the model (growth) or keep state --------------------------------------
    def after_training(self, trainer: Trainer, batches: list) -> None:
        """The epoch's training is done (``trainer.epoch`` counts from 0); evaluation and the checkpoint
        come next. ``batches``: the epoch's micro-batches (inputs, labels, sample indices)."""

    def metrics(self) -> dict[str, Any]:
        """Fields to add to the epoch's record."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """What the checkpoint must hold for this callback (None: nothing)."""
        return None

    def resize(self, module: Any, state: dict[str, Any], saved: dict[str, Any]) -> bool:
        """Before a stage's weights ``state`` are loaded: reshape ``module`` to them; True if it changed."""
        return False

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        pass
