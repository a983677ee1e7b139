"""``local``: decoupled greedy learning (DGL; docs/methods.md §5).

Stage j forwards micro-batch ``t - j`` at tick t, backwards it at once through its own auxiliary head
(its input is detached: nothing is sent back) and updates. No backward message ever crosses a stage
boundary, so stages never wait for a later one. The last stage trains on the model's loss. Needs a
head on every stage but the last (the ``aux-heads`` pass, or the ``dgl`` composite).
"""

from __future__ import annotations

from typing import Any

import torch

from ...state import transient_graph
from ..executor import Kept, StageExecutor, detach_tree, detached
from .base import Message, Policy, register, require_heads
from .policies import GraphPolicy
from .families import LocalSchedule


class LocalPolicy(Policy):
    """Keep the head loss's graph within the tick; backward is that loss's own."""

    name = "local"

    def wants_target(self, ex: StageExecutor) -> bool:
        return True

    def forward(self, ex: StageExecutor, mb: int, message: Message, target: Any) -> Message | None:
        keep = Kept()
        inputs = detach_tree(message["activations"], grad=False)
        with torch.enable_grad(), ex.counting(keep), transient_graph(), ex.phase("forward"):  # backward: this tick
            out = ex.call(inputs)
            keep.outputs, _ = ex.head_loss(out, target, detach=False)
        ex.keep(mb, keep)
        return {"activations": detached(out)}

    def backward(self, ex: StageExecutor, mb: int, message: Message | None) -> Message | None:
        with torch.enable_grad(), ex.phase("backward"):
            ex.take(mb).outputs.backward()
        ex.accumulated()
        return None


@register
class Local(LocalSchedule):
    name = "local"
    summary = "each stage trains on its auxiliary head's loss; no backward messages (DGL)"

    def policy(self, stage: int, stages: int, module: Any, inverse: Any) -> Policy:
        return GraphPolicy(self.layout, transient=True) if stage == stages - 1 else LocalPolicy(self.layout)

    def check(self, staged: Any) -> None:
        require_heads(self, staged)
