"""The stage policies several schedules share (docs/methods.md §2).

| policy   | kept per in-flight micro-batch | backward uses                                  | schedules                |
|----------|--------------------------------|------------------------------------------------|--------------------------|
| graph    | the autograd graph             | forward-time everything                        | backprop, gpipe, 1f1b;   |
|          |                                |                                                | every last stage         |
| snapshot | autograd graph + weight copy   | forward-time weights and input                 | delayed-exact            |
| stash    | input + weight copy            | stashed weights, stored input                  | stash (PipeDream)        |
| input    | input                          | current weights, stored input                  | dsp; petra elsewhere     |
| invert   | nothing                        | current weights, input rebuilt by inversion    | petra on invertible      |
|          |                                |                                                | stages                   |

The recomputing policies (stash, input, invert) run the stage again under autograd in its backward,
with its buffers frozen and the forward's RNG state replayed. A backward message carries the gradient
with respect to the stage's inputs, and, when the schedule's layout names ``activations`` (petra),
the inputs themselves (reconstructed or stored), which the stage before inverts further.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ...state import frozen_buffers, transient_graph
from ..executor import Kept, StageExecutor, backward_from, detach_tree, detached, input_gradients, replayed
from .base import Layout, Message, Policy


def backward_message(layout: Layout, inputs: tuple) -> Message:
    """The fields a backward message carries, from the stage's inputs after backward."""
    message: Message = {"gradients": input_gradients(inputs)}
    if "activations" in layout.backward:
        message["activations"] = detached(inputs)
    return message


class GraphPolicy(Policy):
    """Keep the autograd graph (``snapshot``: of a forward on copies of the weights). ``transient``:
    the backward runs in the same tick as the forward (an asynchronous schedule's last stage), so
    memory-saving modules need not recompute (:func:`gradxform.state.transient_graph`)."""

    def __init__(self, layout: Layout, snapshot: bool = False, transient: bool = False):
        super().__init__(layout)
        self.snapshot, self.transient = snapshot, transient
        self.name = "snapshot" if snapshot else "graph"

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        keep = Kept()
        inputs = detach_tree(message["activations"], grad=True)
        keep.weights = ex.weight_copies(grad=True) if self.snapshot else None
        with torch.enable_grad(), ex.counting(keep), transient_graph() if self.transient else nullcontext(), \
                ex.phase("forward"):
            out = ex.call(inputs, keep.weights)
            if ex.last:
                out = ex.model_loss(out, target)
        keep.inputs, keep.outputs = inputs, out
        ex.keep(mb, keep)
        return None if ex.last else {"activations": detached(out)}

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        keep = ex.take(mb)
        with ex.phase("backward"):
            backward_from(keep.outputs, None if ex.last else message["gradients"])
        if keep.weights is not None:
            ex.add_copy_grads(keep.weights)
        ex.accumulated()
        return backward_message(self.layout, keep.inputs)


class RecomputePolicy(Policy):
    """Keep the input (``input``), the input and a weight copy (``stash``), or nothing (``invert``:
    the input is rebuilt from the next stage's reconstructed activations), and recompute in backward."""

    def __init__(self, layout: Layout, keeps: str):
        super().__init__(layout)
        if keeps not in ("input", "stash", "invert"):
            raise ValueError(f"unknown recompute policy {keeps!r}")
        self.name = keeps

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        keep = Kept()
        inputs = message["activations"]
        if self.name != "invert":
            keep.rng = torch.get_rng_state()
        with torch.no_grad(), ex.phase("forward"):
            out = ex.call(inputs)
        if self.name != "invert":
            keep.inputs = detach_tree(inputs, grad=False)
        if self.name == "stash":
            keep.weights = ex.weight_copies(grad=False)
        ex.keep(mb, keep)
        return {"activations": detached(out)}

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        keep = ex.take(mb)
        if self.name == "invert":
            with ex.phase("inversion"):
                inputs = ex.inverse(*message["activations"])
        else:
            inputs = keep.inputs
        inputs = detach_tree(inputs, grad=True)
        weights = {k: w.requires_grad_(True) for k, w in keep.weights.items()} if keep.weights else None
        # backpropagated at once: reversible chains and stored-input blocks need not recompute again
        with torch.enable_grad(), replayed(keep.rng), frozen_buffers(ex.module), transient_graph():
            with ex.phase("recompute"):
                out = ex.call(inputs, weights)
            with ex.phase("backward"):
                backward_from(out, message["gradients"])
        if weights is not None:
            ex.add_copy_grads(weights)
        ex.accumulated()
        return backward_message(self.layout, inputs)
