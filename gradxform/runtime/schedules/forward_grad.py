"""``forward-grad``: forward gradients guided by local guesses (docs/methods.md §5).

One micro-batch at a time, like ``backprop``, but no gradient ever travels backwards: the forward
messages carry, beside the activations, tangents -- every stage's guesses at its output (the gradient
of its auxiliary head's loss, or random directions), pushed through each later stage by batched JVPs;
the last stage returns the per-sample directional derivatives of the loss along every tangent (scalars
per sample) as the only backward message. Each stage projects them on its own tangents to estimate its
output gradient, then backpropagates that estimate inside itself only. Heads train on their own exact
local loss; the last stage on its true gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...autodiff.forward_grad import forward_mode_safe, make_tangents, project, push
from ...options import option
from ..executor import Kept, StageExecutor, as_tuple, detach_tree, detached
from ..losses import per_sample_losses
from .base import Layout, Message, Policy, Schedule, TickTable, register, require_heads
from .ticks import sequential


@dataclass
class ForwardGradOptions:
    guess: Literal["local", "random"] = option("local", "each stage's guess at its output gradient: its head's "
                                                        "gradient (local) or a Gaussian direction (random)")
    tangents: int = option(1, "tangents per stage (k): the guess plus k-1 random ones")
    combine: Literal["project", "mean"] = option("project", "projection on the tangents' span, or the mean of "
                                                            "d_i v_i")
    accumulate: int = option(1, "backwards per optimizer step (k)")

    def validate(self) -> None:
        if self.tangents < 1:
            raise ValueError("tangents must be at least 1")
        if self.accumulate < 1:
            raise ValueError("accumulate must be at least 1")


class ForwardGradPolicy(Policy):
    """Keep the stage's graph and its own tangents; backward from the projected estimate."""

    name = "forward"

    def __init__(self, layout: Layout, options: ForwardGradOptions):
        super().__init__(layout)
        self.options = options

    def wants_target(self, ex: StageExecutor) -> bool:
        return ex.last or self.options.guess == "local"

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        keep = Kept()
        primals = tuple(message["activations"])
        tangents = tuple(message.get("tangents", (None,) * len(primals)))
        x = detach_tree(primals, grad=True)
        where = f"stage {ex.index}"
        rng = torch.get_rng_state()  # the tangents are pushed through the masks this forward draws
        with torch.enable_grad(), ex.counting(keep):
            out = ex.call(x)
            if ex.last:
                loss = ex.model_loss(out, target)
        if ex.last:
            with forward_mode_safe(ex.module):
                keep.derivatives = push(lambda *a: per_sample_losses(ex.module(*a), target), primals, tangents,
                                        where, ex.module, rng)
            keep.outputs = loss
            ex.keep(mb, keep)
            return None
        outs = as_tuple(out)
        index = ex.head.output_index if ex.head is not None else next(
            i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point())
        h = outs[index]
        guess = None
        if self.options.guess == "local":
            loss, h_in = ex.head_loss(out, target, detach=True)
            with torch.enable_grad():
                loss.backward()  # the head's parameters train on their own loss; h_in.grad is the guess
            guess = h_in.grad
        k = self.options.tangents
        own = make_tangents(h, guess, k)
        pushed = None
        if ex.index > 0:
            with forward_mode_safe(ex.module):
                pushed = as_tuple(push(ex.module, primals, tangents, where, ex.module, rng))
        sent = []
        for i, o in enumerate(outs):
            if not (isinstance(o, torch.Tensor) and o.is_floating_point()):
                sent.append(None)
                continue
            parts = [pushed[i]] if pushed is not None else []
            parts.append(own if i == index else own.new_zeros((k,) + tuple(o.shape)))
            sent.append(torch.cat(parts))
        keep.outputs, keep.tangents = h, own
        ex.keep(mb, keep)
        return {"activations": detached(outs), "tangents": tuple(sent)}

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        keep = ex.take(mb)
        with torch.enable_grad():
            if ex.last:
                keep.outputs.backward()
                d = keep.derivatives
            else:
                (d,) = message["derivatives"]
                k = self.options.tangents
                # a single random tangent: <t, e> e, unbiased; normalising by |e|^2 would shrink it to t / D
                combine = "mean" if self.options.guess == "random" and k == 1 else self.options.combine
                estimate = project(keep.tangents, d[-k:], combine)
                ex.check(estimate, "forward-gradient estimate")
                keep.outputs.backward(estimate)
                d = d[:-k]
        ex.accumulated()
        return {"derivatives": (d,)} if ex.index > 0 else None


@register
class ForwardGrad(Schedule):
    name = "forward-grad"
    summary = "forward gradients: tangents pushed by JVPs, projected per stage; no gradient sent back"
    Options = ForwardGradOptions
    family = "local"
    steps_together = True
    layout = Layout(forward=("activations", "tangents"), backward=("derivatives",))

    def ticks(self, stages: int, micro_batches: int) -> TickTable:
        return sequential(self.name, stages, micro_batches, self.options.accumulate)

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return ForwardGradPolicy(self.layout, self.options)

    def check(self, staged: Any) -> None:
        if self.options.guess == "local":
            require_heads(self, staged, hint=", or use forward-grad{guess=random}")
