"""Growing a network while it trains (docs/methods.md §8): the runtime side of ``gradxform.nn.growth``.

Every ``every`` epochs, after the epoch's training and before its evaluation and checkpoint, the model
grows by one step: statistics over this epoch's micro-batches (a statistical batch of up to ``samples``
samples, the last micro-batches held out), the best update of the existing weights and new neurons in
closed form, a line search over the scale on the held-out micro-batches (the function changes by the
chosen decrease; at scale 0 it would not change at all), and the optimizer's state grown with zeros
for the new rows and columns. The step's report goes into the epoch's metrics (``growth``). The
checkpoint holds the grown shapes and the inserted blocks, so ``--resume`` rebuilds them first and
continues bit for bit. One stage only: a stage grown in place would leave a pipeline unbalanced.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import GradxformError
from ..ir.growth import explain_none, growable_pairs, growth_record
from ..nn.growth import GrowthConfig, GrowthStep, resize_to_state
from .callbacks import Callback


class Growth(Callback):
    """A training callback that grows the model."""

    def __init__(self, config: GrowthConfig, samples: int = 1024, held_out: int = 2):
        self.config, self.samples, self.held_out = config, samples, held_out
        self.step: GrowthStep | None = None
        self.last: dict[str, Any] | None = None

    def attach(self, trainer: Any) -> None:
        if trainer.n != 1:
            raise GradxformError(f"growth works on a one-stage model, and this one has {trainer.n} stages",
                                 hint="grow the unsplit model (drop split from the pipeline), then split the grown "
                                      "model for a pipeline")
        (ex,) = trainer.executors.values()
        if not isinstance(ex.module, torch.fx.GraphModule):
            raise GradxformError("growth needs the compiled graph of the model", hint="train a compiled model")
        pairs, rejected = growable_pairs(ex.module)
        if not pairs:  # say so before the first epoch, not after it
            raise GradxformError(f"--grow-every: the model has no growable pair: {explain_none(rejected)}",
                                 hint="growth adds units between Linear -> activation -> Linear or Conv2d -> "
                                      "(BatchNorm) -> activation -> Conv2d layers")
        self.step = GrowthStep(ex.module, ex.optimizer, self.config)

    def after_training(self, trainer: Any, batches: list) -> None:
        """The epoch's training is done (``trainer.epoch`` is its number, from 0): grow when due."""
        self.last = None
        if not self.step.due(trainer.epoch + 1):
            return
        (ex,) = trainer.executors.values()
        self.step.optimizer = ex.optimizer
        pairs = [(x, y) for x, y, _ in batches]
        keep, total = [], 0
        for x, y in pairs[:-self.held_out] or pairs:
            if total >= self.samples:
                break
            keep.append((x, y))
            total += len(y)
        with torch.random.fork_rng(devices=[]):  # the training's random stream stays as it was
            report = self.step(keep, pairs[-self.held_out:], trainer.epoch + 1)
        self.last = self.step.log[-1]
        if report.grown:
            ex.refresh()

    def metrics(self) -> dict[str, Any]:
        return {"growth": self.last} if self.last is not None else {}

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        blocks = growth_record(self.step.model).get("blocks", [])
        return {"log": self.step.log, "stopped": self.step.stopped, "blocks": list(blocks)}

    def resize(self, module: torch.nn.Module, state: dict[str, Any], saved: dict[str, Any]) -> bool:
        """Rebuild the grown shapes ``state`` (a stage's weights) has, before they are loaded."""
        return resize_to_state(module, state, saved.get("blocks", []))

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step.log, self.step.stopped = list(saved.get("log", [])), saved.get("stopped", "")
