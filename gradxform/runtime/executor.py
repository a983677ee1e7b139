"""The stage executor: performs a schedule's actions on one stage.

What a stage keeps between a micro-batch's forward and its backward is the schedule's *policy*
(docs/methods.md §2):

| policy   | schedules                        | kept per in-flight micro-batch | backward uses              |
|----------|----------------------------------|--------------------------------|----------------------------|
| graph    | backprop, gpipe, 1f1b            | the autograd graph             | forward-time everything    |
| snapshot | delayed-exact                    | autograd graph + weight copy   | forward-time weights/input |
| stash    | stash (PipeDream)                | input + weight copy            | stashed weights, input     |
| input    | dsp; petra on non-invertible     | input                          | current weights, input     |
| invert   | petra on invertible stages       | nothing                        | current weights, input     |
|          |                                  |                                | reconstructed by inversion |
| local    | local (DGL)                      | the head loss's graph, within  | the auxiliary head's loss  |
|          |                                  | one tick                       |                            |
| forward  | forward-grad                     | autograd graph + own tangents  | the forward-gradient       |
|          |                                  |                                | estimate at the output     |

Backward messages carry the gradient with respect to the boundary tensors; for ``petra`` they also
carry the reconstructed boundary activation, which an invertible stage inverts further. Recomputes
run with the stage's buffers frozen (BatchNorm statistics are updated once, in the forward) and with
the forward's RNG state replayed (dropout draws the same mask).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.func import functional_call

from ..state import frozen_buffers

POLICIES = {"backprop": "graph", "gpipe": "graph", "1f1b": "graph", "delayed-exact": "snapshot",
            "stash": "stash", "dsp": "input", "petra": "input", "local": "local", "forward-grad": "forward"}


class TrainingError(RuntimeError):
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
    losses: list[float] = field(default_factory=list)
    local_losses: list[float] = field(default_factory=list)  # auxiliary head losses (local, forward-grad)


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class StageExecutor:
    """One pipeline stage: its module, optimizer, and what it keeps for in-flight micro-batches.

    Every stage is called with a flat tuple of tensors (stage 0: the model's inputs bound to its
    placeholders, see :func:`gradxform.runtime.engine.first_inputs`). ``inverse``, when given, maps the stage's output tuple to its input tuple (a reversible stage);
    with the ``petra`` schedule such a stage keeps nothing. ``loss_fn(output, target)`` is used on the
    last stage.
    """

    def __init__(self, index: int, stages: int, module: torch.nn.Module, schedule: str,
                 optimizer: torch.optim.Optimizer, loss_fn: Callable | None = None,
                 inverse: Callable | None = None, guess: str = "local", tangents: int = 1,
                 combine: str = "project"):
        self.index, self.stages = index, stages
        self.guess, self.n_tangents, self.combine = guess, tangents, combine
        self.module = module
        self.schedule = schedule
        self.policy = "invert" if schedule == "petra" and inverse is not None else POLICIES[schedule]
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.inverse = inverse
        self.kept: dict[int, Kept] = {}
        self.pending = 0  # backwards accumulated since the last update
        self.stats = StageStats()
        self.after_update: list[Callable[[], bool]] = []  # e.g. adaptive rank; True: parameters changed
        self.head = getattr(module, "aux_head", None)
        if self.policy in ("local", "forward") and not self.last and self.head is None and \
                (self.policy == "local" or guess == "local"):
            from ..errors import GradxformError

            raise GradxformError(f"stage {index} has no auxiliary head, which the {schedule} schedule trains it on",
                                 hint="compile with aux-heads after split (or the dgl / fwd-local composites)"
                                      + (", or use forward-grad{guess=random}" if schedule == "forward-grad" else ""))
        self.refresh()

    @property
    def wants_target(self) -> bool:
        """Whether this stage's forward needs the labels (the last stage, and stages with local losses)."""
        return self.last or (self.policy == "local" or (self.policy == "forward" and self.guess == "local"))

    def refresh(self) -> None:
        """Re-read the stage's parameters (after a layer changed shape, e.g. a rank truncation)."""
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.named = {k: p for k, p in self.module.named_parameters() if p.requires_grad}

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    # -- running the stage ---------------------------------------------------------------------
    def _call(self, inputs: tuple, weights: dict | None = None) -> Any:
        if weights is not None:
            return functional_call(self.module, weights, inputs)
        return self.module(*inputs)

    # -- actions --------------------------------------------------------------------------------
    def forward(self, mb: int, inputs: tuple, target: Any = None) -> Any:
        """Forward micro-batch ``mb``; returns the boundary tuple, or on the last stage the loss."""
        with _timed(self.stats):
            return self._forward(mb, inputs, target)

    def backward(self, mb: int, grads: tuple | None, activations: tuple | None = None) -> tuple[tuple, tuple | None]:
        """Backward micro-batch ``mb`` from the gradients of its outputs (``None`` on the last stage).

        ``activations`` is the reconstructed output (petra); returns the gradients of the stage's
        inputs and, for petra, the reconstructed inputs to send upstream.
        """
        with _timed(self.stats):
            return self._backward(mb, grads, activations)

    def update(self) -> None:
        """One optimizer step with the mean of the gradients accumulated since the last one."""
        with _timed(self.stats):
            self._update()

    def _forward(self, mb: int, inputs: tuple, target: Any = None) -> Any:
        self.stats.forwards += 1
        if self.policy == "local" and not self.last:
            return self._forward_local(mb, inputs, target)
        if self.policy == "forward":
            return self._forward_tangents(mb, inputs, target)
        keep = Kept()
        if self.policy in ("stash", "input", "snapshot"):
            keep.rng = torch.get_rng_state()
        if self.policy in ("graph", "snapshot") or self.last:
            inputs = _detach_tree(inputs, grad=True)
            weights = None
            if self.policy == "snapshot":
                weights = {k: p.detach().clone().requires_grad_(True) for k, p in self.named.items()}
                keep.weights = weights
            with torch.enable_grad(), _counting(keep):
                out = self._call(inputs, weights)
                if self.last:
                    out = self._model_loss(out, target)
            keep.inputs, keep.outputs = inputs, out
        else:
            with torch.no_grad():
                out = self._call(inputs)
            if self.policy in ("input", "stash"):
                keep.inputs = _detach_tree(inputs, grad=False)
            if self.policy == "stash":
                keep.weights = {k: p.detach().clone() for k, p in self.named.items()}
        self.kept[mb] = keep
        self._note_step(keep)
        if self.last:
            return out.detach()
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in _as_tuple(out))

    def _backward(self, mb: int, grads: tuple | None, activations: tuple | None) -> tuple[tuple | None, tuple | None]:
        self.stats.backwards += 1
        keep = self.kept.pop(mb)
        if self.policy == "local":  # the local loss (or, on the last stage, the model's loss); nothing to send
            with torch.enable_grad():
                keep.outputs.backward()
            self.pending += 1
            return None, None
        if self.policy == "forward":
            return self._backward_tangents(keep, grads)
        if self.last or self.policy in ("graph", "snapshot"):
            out = keep.outputs
            outs = [out] if self.last else [o for o in _as_tuple(out) if isinstance(o, torch.Tensor)]
            gs = [None] if self.last else [g for o, g in zip(_as_tuple(out), grads) if isinstance(o, torch.Tensor)]
            pairs = [(o, g) for o, g in zip(outs, gs) if o.requires_grad]
            with torch.enable_grad():
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if keep.weights is not None:  # snapshot: gradients landed on the forward-time copy
                for k, w in keep.weights.items():
                    _add_grad(self.named[k], w.grad)
            inputs = keep.inputs
        else:
            if self.policy == "invert":
                inputs = self.inverse(*activations)
            else:
                inputs = keep.inputs
            inputs = _detach_tree(inputs, grad=True)
            weights = None
            if self.policy == "stash":
                weights = {k: w.requires_grad_(True) for k, w in keep.weights.items()}
            replay = _replay(keep.rng) if keep.rng is not None else contextlib.nullcontext()
            with torch.enable_grad(), replay, frozen_buffers(self.module):
                out = _as_tuple(self._call(inputs, weights))
                pairs = [(o, g) for o, g in zip(out, grads) if isinstance(o, torch.Tensor) and o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if weights is not None:
                for k, w in weights.items():
                    _add_grad(self.named[k], w.grad)
        self.pending += 1
        grads_in = tuple(x.grad if isinstance(x, torch.Tensor) and x.grad is not None
                         else (torch.zeros_like(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else None)
                         for x in inputs)
        recon = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs) \
            if self.schedule == "petra" else None
        return grads_in, recon

    # -- local learning ---------------------------------------------------------------------------
    def _model_loss(self, out: Any, target: Any) -> torch.Tensor:
        """The last stage's loss, checked and recorded."""
        loss = self.loss_fn(out, target)
        self._check(loss, "loss")
        self.stats.losses.append(float(loss.detach()))
        return loss

    def _head_loss(self, out: Any, target: Any, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary head's loss (checked and recorded) and the head's input: the stage output
        itself (local: the loss trains the stage), or with ``detach`` a copy whose grad is the local
        guess (forward-grad: the loss trains the head alone)."""
        h = _as_tuple(out)[self.head.output_index]
        h_in = h.detach().requires_grad_(True) if detach else h
        loss = self.loss_fn(self.head(h_in), target)
        self._check(loss, "auxiliary loss")
        self.stats.local_losses.append(float(loss.detach()))
        return loss, h_in

    def _forward_local(self, mb: int, inputs: tuple, target: Any) -> tuple:
        keep = Kept()
        inputs = _detach_tree(inputs, grad=False)
        with torch.enable_grad(), _counting(keep):
            out = self.module(*inputs)
            loss, _ = self._head_loss(out, target, detach=False)
        keep.outputs = loss
        self.kept[mb] = keep
        self._note_step(keep)
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in _as_tuple(out))

    def _forward_tangents(self, mb: int, inputs: tuple, target: Any) -> Any:
        from .forward_grad import forward_mode_safe, make_tangents, per_sample_losses, push

        keep = Kept()
        n = len(inputs) // 2 if self.index > 0 else len(inputs)
        primals, tangents = tuple(inputs[:n]), tuple(inputs[n:]) if self.index > 0 else (None,) * n
        x = _detach_tree(primals, grad=True)
        where = f"stage {self.index}"
        with torch.enable_grad(), _counting(keep):
            out = self.module(*x)
            if self.last:
                loss = self._model_loss(out, target)
        if self.last:
            with forward_mode_safe(self.module):
                d = push(lambda *a: per_sample_losses(self.module(*a), target), primals, tangents, where,
                         self.module)
            keep.outputs, keep.derivatives = loss, d
            self.kept[mb] = keep
            self._note_step(keep)
            return loss.detach()
        outs = _as_tuple(out)
        index = self.head.output_index if self.head is not None else next(
            i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point())
        h = outs[index]
        guess = None
        if self.guess == "local":
            loss, h_in = self._head_loss(out, target, detach=True)
            with torch.enable_grad():
                loss.backward()  # the head's parameters train on their own loss; h_in.grad is the guess
            guess = h_in.grad
        own = make_tangents(h, guess, self.n_tangents)
        pushed = None
        if self.index > 0:
            with forward_mode_safe(self.module):
                pushed = push(self.module, primals, tangents, where, self.module)
            pushed = _as_tuple(pushed)
        sent = []
        for i, o in enumerate(outs):
            if not (isinstance(o, torch.Tensor) and o.is_floating_point()):
                sent.append(None)
                continue
            parts = [pushed[i]] if pushed is not None else []
            parts.append(own if i == index else own.new_zeros((self.n_tangents,) + tuple(o.shape)))
            sent.append(torch.cat(parts))
        keep.outputs, keep.tangents = h, own
        self.kept[mb] = keep
        self._note_step(keep)
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in outs) + tuple(sent)

    def _backward_tangents(self, keep: Kept, grads: tuple | None) -> tuple[tuple | None, None]:
        from .forward_grad import project

        with torch.enable_grad():
            if self.last:
                keep.outputs.backward()
                d = keep.derivatives
            else:
                (d,) = grads
                k = self.n_tangents
                # a single random tangent: <t, e> e, unbiased; normalising by |e|^2 would shrink it to t / D
                combine = "mean" if self.guess == "random" and k == 1 else self.combine
                estimate = project(keep.tangents, d[-k:], combine)
                self._check(estimate, "forward-gradient estimate")
                keep.outputs.backward(estimate)
                d = d[:-k]
        self.pending += 1
        return ((d,) if self.index > 0 else None), None

    def _update(self) -> None:
        if not self.pending:
            return
        for p in self.params:
            if p.grad is not None:
                if self.pending > 1:
                    p.grad.div_(self.pending)
                self._check(p.grad, "gradient")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.stats.updates += 1
        if any([hook() for hook in self.after_update]):
            self.refresh()

    def kept_bytes(self) -> int:
        return sum(k.nbytes() for k in self.kept.values())

    def end_tick(self) -> None:
        """Record what the stage holds from this tick to the next (the schedule's memory cost)."""
        self.stats.peak_kept_bytes = max(self.stats.peak_kept_bytes, self.kept_bytes())

    def _note_step(self, keep: Kept) -> None:
        self.stats.peak_step_bytes = max(self.stats.peak_step_bytes, keep.nbytes())

    def _check(self, t: torch.Tensor, what: str) -> None:
        if not torch.isfinite(t).all():
            raise TrainingError(f"stage {self.index}: non-finite {what} "
                                f"(after {self.stats.updates} updates); lower the learning rate or check the data")


def _detach_tree(inputs: tuple, grad: bool) -> tuple:
    return tuple(x.detach().requires_grad_(grad and x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                 for x in inputs)


def _add_grad(p: torch.Tensor, g: torch.Tensor | None) -> None:
    if g is None:
        return
    p.grad = g.detach().clone() if p.grad is None else p.grad + g


@contextlib.contextmanager
def _timed(stats: StageStats):
    start = time.perf_counter()
    try:
        yield
    finally:
        stats.busy_seconds += time.perf_counter() - start


@contextlib.contextmanager
def _counting(keep: Kept):
    """Count the bytes autograd saves for backward into ``keep.graph_bytes``."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are not per-micro-batch memory
            keep.graph_bytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def _replay(state: torch.Tensor):
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield
