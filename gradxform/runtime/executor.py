"""The stage executor: one pipeline stage, its optimizer, and the mechanics every schedule shares.

What a stage keeps between a micro-batch's forward and its backward, and how that backward runs, is
its schedule's *policy* (:class:`gradxform.runtime.schedules.base.Policy`). The executor holds what is
common to all of them: the module and optimizer, the micro-batches in flight, gradient accumulation and
the optimizer step, checks for non-finite values, timing, and exact accounting of the bytes kept
(tensors held from one tick to the next, and what autograd saves for backward, counted with
``saved_tensors_hooks``). Policies do their work through the primitives below.

Recomputes run with the stage's buffers frozen (BatchNorm statistics are updated once, in the
forward) and with the forward's RNG state replayed (dropout draws the same mask).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.func import functional_call

from ..errors import GradxformError
from .losses import classification_loss

if TYPE_CHECKING:  # the schedules' policies call back into the executor
    from .schedules.base import Message, Policy, Schedule


class TrainingError(GradxformError):
    """Training cannot go on (a non-finite loss or gradient); names the stage."""


@dataclass
class Kept:
    """What a stage holds for one in-flight micro-batch."""

    inputs: tuple | None = None
    outputs: Any = None
    weights: dict[str, torch.Tensor] | None = None
    rng: torch.Tensor | None = None
    tangents: torch.Tensor | None = None   # forward-grad: this stage's own tangents at its head input
    derivatives: torch.Tensor | None = None  # forward-grad, last stage: d for every upstream tangent
    graph_bytes: int = 0  # bytes the autograd graph saved for backward (exact, from saved_tensors_hooks)

    def nbytes(self) -> int:
        tensors = [t for t in pytree.tree_leaves((self.inputs, self.outputs, self.weights, self.rng))
                   if isinstance(t, torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:  # count storage once: views and shared inputs are not copies
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total + self.graph_bytes


@dataclass
class StageStats:
    forwards: int = 0
    backwards: int = 0
    updates: int = 0
    peak_kept_bytes: int = 0
    peak_step_bytes: int = 0    # the most one micro-batch kept for its backward (graph, inputs, tangents)
    busy_seconds: float = 0.0   # time spent in forward, backward and update
    # where that time went: forward, inversion, recompute, backward (the VJP), optimizer
    phases: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    local_losses: list[float] = field(default_factory=list)  # auxiliary head losses (local, forward-grad)


def as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def detached(out: Any) -> tuple:
    """A stage's output as a tuple of tensors cut from their graph (what a forward message carries)."""
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in as_tuple(out))


def detach_tree(inputs: tuple, grad: bool) -> tuple:
    """Inputs cut from their graph, floating-point ones requiring grad when ``grad``."""
    return tuple(x.detach().requires_grad_(grad and x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                 for x in inputs)


def input_gradients(inputs: tuple) -> tuple:
    """The gradient of every floating-point input (zeros where none reached it; None for others)."""
    return tuple(x.grad if isinstance(x, torch.Tensor) and x.grad is not None
                 else (torch.zeros_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None)
                 for x in inputs)


def backward_from(outputs: Any, grads: tuple | None) -> None:
    """Backpropagate ``grads`` (None: a scalar loss) from the tensors of ``outputs`` that need it."""
    outs = as_tuple(outputs)
    gs = (None,) * len(outs) if grads is None else grads
    pairs = [(o, g) for o, g in zip(outs, gs) if isinstance(o, torch.Tensor) and o.requires_grad]
    with torch.enable_grad():
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def add_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    """Add a gradient computed on a copy of ``p`` (stashed or snapshot weights) to ``p.grad``."""
    if g is None:
        return
    p.grad = g.detach().clone() if p.grad is None else p.grad + g


@contextlib.contextmanager
def replayed(state: torch.Tensor | None) -> Iterator[None]:
    """Run with the RNG state captured at forward time (nothing to replay: as is)."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield


class StageExecutor:
    """One pipeline stage: its module, optimizer, policy, and what it keeps for in-flight micro-batches.

    Every stage is called with a flat tuple of tensors (stage 0: the model's inputs bound to its
    placeholders, :meth:`gradxform.nn.StagedModule.first_inputs`). ``inverse``, when given, maps the
    stage's output tuple to its input tuple (a reversible stage), which some policies use instead of
    storing the input. ``loss_fn(output, target)`` is the last stage's loss.
    """

    def __init__(self, index: int, stages: int, module: torch.nn.Module, schedule: Schedule,
                 optimizer: torch.optim.Optimizer, loss_fn: Callable = classification_loss,
                 inverse: Callable | None = None):
        self.index, self.stages = index, stages
        self.module = module
        self.schedule = schedule
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.inverse = inverse
        self.head = getattr(module, "aux_head", None)
        self.policy: Policy = schedule.policy(index, stages, module, inverse)
        self.kept: dict[int, Kept] = {}
        self.pending = 0  # backwards accumulated since the last update
        self.stats = StageStats()
        self.sample_indices: Callable[[int], torch.Tensor] | None = None  # mb -> its samples' dataset indices
        self.before_update: list[Callable[[], None]] = []  # e.g. summing tied copies' gradients
        self.after_update: list[Callable[[], bool]] = []  # e.g. adaptive rank; True: parameters changed
        self.refresh()

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    @property
    def wants_target(self) -> bool:
        """Whether this stage's forward needs the labels."""
        return self.policy.wants_target(self)

    def refresh(self) -> None:
        """Re-read the stage's parameters (after a layer changed shape, e.g. a rank truncation)."""
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.named = {k: p for k, p in self.module.named_parameters() if p.requires_grad}

    # -- actions (what the tick loop calls) ----------------------------------------------------------
    def forward(self, mb: int, message: Message, target: Any = None) -> Message | None:
        """Forward micro-batch ``mb``; returns the message for the next stage (None on the last)."""
        with self._timed():
            self.stats.forwards += 1
            return self.policy.forward(self, mb, message, target)

    def backward(self, mb: int, message: Message | None) -> Message | None:
        """Backward micro-batch ``mb`` from the next stage's message (None on the last stage, or when
        the schedule sends none); returns the message for the stage before, or None."""
        with self._timed():
            self.stats.backwards += 1
            return self.policy.backward(self, mb, message)

    def update(self, backwards: int | None = None) -> None:
        """One optimizer step with the mean of the gradients of the ``backwards`` accumulated since
        the last one (default: as counted; 1 when another engine already averaged them)."""
        with self._timed(), self.phase("optimizer"):
            if backwards is not None:
                self.pending = backwards
            if not self.pending:
                return
            for hook in self.before_update:
                hook()
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.pending > 1:
                torch._foreach_div_(grads, self.pending)
            self.check_all(grads, "gradient")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
            self.stats.updates += 1
            if any([hook() for hook in self.after_update]):
                self.refresh()

    def end_tick(self) -> None:
        """Record what the stage holds from this tick to the next (the schedule's memory cost)."""
        self.stats.peak_kept_bytes = max(self.stats.peak_kept_bytes, self.kept_bytes())

    def kept_bytes(self) -> int:
        return sum(k.nbytes() for k in self.kept.values())

    # -- primitives for policies ---------------------------------------------------------------------
    def call(self, inputs: tuple, weights: dict | None = None) -> Any:
        """The stage's module on ``inputs``, with its own parameters or with ``weights`` in their place."""
        if weights is not None:
            return functional_call(self.module, weights, inputs)
        return self.module(*inputs)

    def keep(self, mb: int, kept: Kept) -> None:
        """Hold ``kept`` until micro-batch ``mb``'s backward."""
        self.kept[mb] = kept
        self.stats.peak_step_bytes = max(self.stats.peak_step_bytes, kept.nbytes())

    def take(self, mb: int) -> Kept:
        return self.kept.pop(mb)

    def accumulated(self, backwards: int = 1) -> None:
        """Count backwards whose gradients now sit in the parameters' ``.grad``."""
        self.pending += backwards

    def weight_copies(self, grad: bool) -> dict[str, torch.Tensor]:
        """A copy of every trained parameter (a stash or a snapshot of the forward-time weights)."""
        return {k: p.detach().clone().requires_grad_(grad) for k, p in self.named.items()}

    def add_copy_grads(self, weights: dict[str, torch.Tensor]) -> None:
        """Gradients that landed on weight copies go to the parameters they copy."""
        for k, w in weights.items():
            add_grad(self.named[k], w.grad)

    def model_loss(self, out: Any, target: Any) -> torch.Tensor:
        """The last stage's loss, checked and recorded."""
        loss = self.loss_fn(out, target)
        self.record_loss(loss)
        return loss

    def record_loss(self, loss: torch.Tensor) -> None:
        self.check(loss.detach(), "loss")
        self.stats.losses.append(float(loss.detach()))

    def head_loss(self, out: Any, target: Any, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary head's loss (checked and recorded) and the head's input: the stage output
        itself (the loss trains the stage), or with ``detach`` a copy whose grad is the head's guess
        (the loss trains the head alone)."""
        h = as_tuple(out)[self.head.output_index]
        h_in = h.detach().requires_grad_(True) if detach else h
        loss = self.loss_fn(self.head(h_in), target)
        self.check(loss, "auxiliary loss")
        self.stats.local_losses.append(float(loss.detach()))
        return loss, h_in

    @contextlib.contextmanager
    def counting(self, keep: Kept) -> Iterator[None]:
        """Count the bytes autograd saves for backward into ``keep.graph_bytes``."""
        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):  # weights are not per-micro-batch memory
                keep.graph_bytes += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def check_all(self, tensors: list[torch.Tensor], what: str) -> None:
        """``check`` of many tensors in one fused reduction and one sync: a non-finite entry makes its
        tensor's norm non-finite (a norm can also overflow on finite entries: then each is looked at)."""
        if tensors and not torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
            for t in tensors:
                self.check(t, what)

    def check(self, t: torch.Tensor, what: str) -> None:
        if not torch.isfinite(t).all():
            raise TrainingError(f"stage {self.index}: non-finite {what} (after {self.stats.updates} updates)",
                                hint="lower the learning rate (--lr), or check the data for NaN or huge values")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time spent in a named part of the stage's work (the per-stage breakdown of the benchmarks)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.phases[name] = self.stats.phases.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.busy_seconds += time.perf_counter() - start
