"""F³ feedback: the connector's gradient, the feedback matrices, the error kinds and the error buffer.

F³ (Flügel et al., arXiv 2304.13372; ALGORITHMS.md §7) trains each block k on

    δh_k = e_n · B_k          B_k ∈ R^{C × n_k} fixed,  e_n ∈ R^C the sample's error from the previous epoch

instead of the backpropagated gradient. :class:`FeedbackFunction` puts that into autograd: its forward
passes the block output on with the incoming gradient path cut (what comes back from later blocks is
dropped), its backward returns e·B reshaped to the activation. One ``loss.backward()`` then trains
every block at once: the last block on the true loss gradient, the others on their own e·B.

The error ``e`` comes from an :class:`ErrorBuffer` (one row per training sample, indexed by the
sample's dataset index, see :func:`with_indices`), initialised with the targets (one-hot for
classes), so that the first epoch is DRTP, and rewritten after every step with the chosen error
kind of that step's output. Every kind has the sign of −∂L/∂ŷ:

=============================  ==========================================================
``delayed-error``              y − ŷ
``delayed-error-softmax``      y − softmax(ŷ)
``delayed-loss``               −∂ℓ(ŷ, y)/∂ŷ
``delayed-loss-softmax``       −∂ℓ(softmax(ŷ), y)/∂ŷ
``<kind>-one-hot``             y ⊙ <kind>: only the true class keeps its value (one number per sample)
=============================  ==========================================================

ℓ is the sample's own loss (summed over its outputs, not averaged over the batch), so an error does not
depend on the micro-batch it was computed in. The authors' code differentiates the batch-mean loss
instead, which scales every row by 1/batch (or 1/(batch·C)); Adam is blind to such a constant scale.

Losses: ``bce`` (binary cross-entropy on probabilities: the model ends in a sigmoid, one-hot targets,
as in the authors' MLPs), ``cross-entropy`` (on logits, class targets) and ``mse`` (regression).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..errors import GradxformError

LOSSES = ("bce", "cross-entropy", "mse")
BASE_KINDS = ("delayed-error", "delayed-error-softmax", "delayed-loss", "delayed-loss-softmax")
ERROR_KINDS = BASE_KINDS + tuple(k + "-one-hot" for k in BASE_KINDS)
FEEDBACK_INITS = ("kaiming", "trinomial", "binomial", "identity")


# ------------------------------------------------------------------------------------ the connector

class FeedbackFunction(torch.autograd.Function):
    """``h -> h`` whose backward ignores the incoming gradient and returns ``(e @ B).view_as(h)``.

    ``e @ B`` is formed in the backward, so a micro-batch in flight keeps only ``e`` (C numbers per
    sample) beside the block's own graph, not an activation-sized gradient. In one ``loss.backward()``
    over the whole model, the block after a connector still computes the gradient of its input (autograd
    cannot know that it will be dropped): one input-gradient product per block that backprop would pay
    too. A pipeline stage that receives its input detached computes none.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, e: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e, B)
        ctx.shape, ctx.dtype = h.shape, h.dtype
        # detach: no copy; the version counter stays shared, so an in-place op downstream that
        # would corrupt the block's saved output is still caught by autograd
        return h.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        e, B = ctx.saved_tensors
        return (e.to(B.dtype) @ B).reshape(ctx.shape).to(ctx.dtype), None, None


def feedback(h: torch.Tensor, e: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The F³ connector on one activation: forward ``h``; backward ``e_n · B`` per sample, whatever comes in.

    ``h`` is (N, ...) with n values per sample, ``e`` is (N, C), ``B`` is (C, n).
    """
    n = h[0].numel() if h.dim() else 1
    if e.dim() != 2 or e.shape[0] != h.shape[0] or tuple(B.shape) != (e.shape[1], n):
        raise ValueError(f"feedback: e {tuple(e.shape)} and B {tuple(B.shape)} do not fit an activation "
                         f"{tuple(h.shape)} (expected e (N, C) and B (C, {n}))")
    return FeedbackFunction.apply(h, e.detach(), B)


def is_feedback_output(t: torch.Tensor) -> bool:
    """Whether ``t`` comes straight out of a feedback connector (its gradient is injected, not received)."""
    return isinstance(t.grad_fn, FeedbackFunction._backward_cls)


def feedback_backward(outputs: Any) -> None:
    """Train a stage whose outputs end in connectors, with no loss and no gradient from later stages.

    Every tensor in ``outputs`` that requires grad must come straight out of a connector: the backward
    it starts injects e·B there (the incoming gradient, a free expanded zero, is ignored). This is what
    a pipeline stage runs right after its forward: it updates without waiting for any later stage.
    """
    flat = [t for t in _tensors(outputs) if t.requires_grad]
    bad = [i for i, t in enumerate(flat) if not is_feedback_output(t)]
    if bad:
        raise ValueError(f"feedback_backward: output {bad[0]} does not come from a feedback connector "
                         f"(grad_fn {type(flat[bad[0]].grad_fn).__name__}); it would get a zero gradient")
    if flat:
        zeros = [torch.zeros((), dtype=t.dtype, device=t.device).expand_as(t) for t in flat]
        torch.autograd.backward(flat, zeros)


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


# ---------------------------------------------------------------------------- feedback matrices

def feedback_seed(seed: int, index: int) -> int:
    """The generator seed of connector ``index``: each connector draws its own B, identical on every rank."""
    return (seed * 1_000_003 + index) % (2**63)


def feedback_matrix(init: str, classes: int, width: int, seed: int = 0, index: int = 0,
                    dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """A fixed feedback matrix B (classes × width) for connector ``index``, seeded.

    ``kaiming``: uniform on ±1/√width (kaiming-uniform with a = √5, the nn.Linear default, fan-in =
    width); ``trinomial``: uniform on {−1, 0, 1}; ``binomial``: uniform on {0, 1}; ``identity``: the
    C × C identity tiled with a negated copy, [I, −I, I, −I, ...], cut at ``width`` columns.
    """
    if init not in FEEDBACK_INITS:
        raise ValueError(f"unknown feedback initialisation '{init}'; known: {', '.join(FEEDBACK_INITS)}")
    if classes < 1 or width < 1:
        raise ValueError(f"a feedback matrix needs classes >= 1 and width >= 1, got {classes} x {width}")
    gen = torch.Generator().manual_seed(feedback_seed(seed, index))
    shape = (classes, width)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(width)
        B = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    elif init == "trinomial":
        B = torch.randint(-1, 2, shape, generator=gen).double()
    elif init == "binomial":
        B = torch.randint(0, 2, shape, generator=gen).double()
    else:
        eye = torch.eye(classes, dtype=torch.float64)
        pair = torch.cat([eye, -eye], dim=1)
        B = pair.repeat(1, -(-width // (2 * classes)))[:, :width]
    # drawn in float64 and rounded once: B is the same numbers (to the dtype's precision) whatever the dtype
    return B.to(dtype=dtype, device=device).contiguous()


# --------------------------------------------------------------------------- losses and errors

def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise GradxformError(f"unknown loss '{loss}'", hint=f"known: {', '.join(LOSSES)}")


def check_error_kind(kind: str, loss: str) -> None:
    """Refuse an error kind that does not fit the loss (a message saying why and what fits)."""
    check_loss(loss)
    if kind not in ERROR_KINDS:
        from ..errors import did_you_mean

        raise GradxformError(f"unknown F³ error kind '{kind}'", hint=did_you_mean(kind, ERROR_KINDS))
    base = kind.removesuffix("-one-hot")
    if loss == "mse" and (base.endswith("-softmax") or kind.endswith("-one-hot")):
        raise GradxformError(f"error kind '{kind}' does not fit loss=mse: a regression output has no classes "
                             f"to take a softmax over or to keep one of",
                             hint="use delayed-error (y - y_hat) or delayed-loss (-dL/dy_hat) for regression")
    if loss == "cross-entropy" and base == "delayed-error":
        raise GradxformError(f"error kind '{kind}' does not fit loss=cross-entropy: y - y_hat on logits does "
                             f"not have the sign of -dL/dy_hat = y - softmax(y_hat)",
                             hint=f"use {kind.replace('delayed-error', 'delayed-error-softmax')} or delayed-loss, "
                                  f"or loss=bce on a model ending in a sigmoid")
    if loss == "cross-entropy" and base == "delayed-loss-softmax":
        raise GradxformError(f"error kind '{kind}' does not fit loss=cross-entropy: the loss already applies "
                             f"the softmax, a second one differentiates softmax(softmax(y_hat))",
                             hint=f"use {kind.replace('delayed-loss-softmax', 'delayed-loss')} "
                                  f"(= y - softmax(y_hat) for cross-entropy)")


def target_rows(targets: torch.Tensor, loss: str, classes: int | None = None) -> torch.Tensor:
    """Targets as (N, C) rows: one-hot for classes (from class indices or already one-hot), the
    regression targets themselves for ``mse`` ((N,) becomes (N, 1)). Floating point."""
    check_loss(loss)
    if loss == "mse":
        rows = targets.reshape(len(targets), -1) if targets.dim() != 2 else targets
        return rows if rows.is_floating_point() else rows.double()
    if targets.dim() == 1 and not targets.is_floating_point():
        if classes is None:
            raise ValueError("target_rows: class indices need the number of classes")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise GradxformError(f"class targets range over {int(targets.min())}..{int(targets.max())} but the "
                                 f"model has {classes} outputs")
        return F.one_hot(targets, classes).to(torch.get_default_dtype())
    if targets.dim() == 2 and (classes is None or targets.shape[1] == classes):
        return targets if targets.is_floating_point() else targets.to(torch.get_default_dtype())
    raise GradxformError(f"classification targets of shape {tuple(targets.shape)} for a model with {classes} "
                         f"outputs", hint="give class indices (N,) or one-hot rows (N, C)")


def _class_indices(targets: torch.Tensor) -> torch.Tensor:
    return targets if targets.dim() == 1 else targets.argmax(1)


def check_outputs(outputs: torch.Tensor, loss: str, classes: int | None = None) -> None:
    """The model's output must be (N, C); ``bce`` needs probabilities (a model ending in a sigmoid)."""
    if outputs.dim() != 2 or (classes is not None and outputs.shape[1] != classes):
        want = f"(N, {classes})" if classes is not None else "(N, C)"
        raise GradxformError(f"F³ needs the model's output to be {want}, one row of C values per sample; got "
                             f"{tuple(outputs.shape)}",
                             hint="flatten or pool the prediction to (N, C) in the model (per-token outputs "
                                  "are not supported; a regression model returns (N, 1))")
    if loss == "bce" and outputs.numel() and bool(((outputs < 0) | (outputs > 1)).any()):
        raise GradxformError(f"loss=bce needs outputs in [0, 1] (a model ending in a sigmoid); got values "
                             f"from {float(outputs.min()):.3g} to {float(outputs.max()):.3g}",
                             hint="end the model with a sigmoid, or use loss=cross-entropy on logits")


def loss_value(loss: str, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss: ``bce`` on probabilities with one-hot targets, ``cross-entropy`` on logits,
    ``mse`` -- each with torch's own reduction (``mean``: over every element, or every sample for
    cross-entropy)."""
    classes = outputs.shape[-1]
    if loss == "cross-entropy":
        # class indices, or (N, C) rows taken as class probabilities (one-hot rows give the same loss)
        soft = targets.is_floating_point() and targets.dim() == 2
        return F.cross_entropy(outputs, targets.to(outputs.dtype) if soft else targets, reduction=reduction)
    rows = target_rows(targets, loss, classes).to(outputs.dtype)
    if loss == "bce":
        return F.binary_cross_entropy(outputs, rows, reduction=reduction)
    return F.mse_loss(outputs, rows, reduction=reduction)


def error_rows(kind: str, loss: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The error of each sample, (N, C), for error ``kind`` under ``loss`` (see the module docstring).

    This is the current error of ``outputs``: what DFA uses at once and F³ stores for the next epoch.
    """
    check_error_kind(kind, loss)
    check_outputs(outputs, loss)
    y = target_rows(targets, loss, outputs.shape[1]).to(outputs.dtype)
    out = outputs.detach()
    base = kind.removesuffix("-one-hot")
    if base == "delayed-error":
        e = y - out
    elif base == "delayed-error-softmax":
        e = y - torch.softmax(out, dim=1)
    else:
        with torch.enable_grad():
            o = out.clone().requires_grad_(True)
            p = torch.softmax(o, dim=1) if base == "delayed-loss-softmax" else o
            # the sum of per-sample losses: sample n's row is -d loss_n / d y_hat_n, free of the batch size
            (g,) = torch.autograd.grad(loss_value(loss, p, y, reduction="sum"), o)
        e = -g
    return y * e if kind.endswith("-one-hot") else e


# ----------------------------------------------------------------------------------- the buffer

class ErrorBuffer:
    """E ∈ R^{N_train × C}: each training sample's error, indexed by its dataset index.

    Starts from the targets (one-hot rows for classes), so that F³'s first epoch is DRTP. After each
    step, :meth:`update` writes the error of that step's outputs (taken before the optimizer step) for
    the step's samples; :meth:`rows` reads the rows of the next micro-batch. The ``-one-hot`` kinds
    store one number per sample (the true class's value) and rebuild the row from the stored label.

    Classification buffers keep every sample's label and check each update's targets against it:
    indices that do not name the samples they come with are caught at the first mismatch.
    ``state_dict`` / ``load_state_dict`` carry everything, so a resumed run continues bit for bit.
    """

    def __init__(self, targets: torch.Tensor, kind: str, loss: str, classes: int | None = None,
                 dtype: torch.dtype = torch.float32):
        check_error_kind(kind, loss)
        targets = torch.as_tensor(targets)
        rows = target_rows(targets, loss, classes)
        self.kind, self.loss, self.classes = kind, loss, int(rows.shape[1])
        self.one_hot = kind.endswith("-one-hot")
        self.labels = rows.argmax(1) if loss != "mse" else None
        if self.one_hot:
            self.values = torch.ones(len(rows), dtype=dtype)
        else:
            self.values = rows.to(dtype).clone()

    def __len__(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held: the error values (and, for classification, the labels)."""
        extra = self.labels.numel() * self.labels.element_size() if self.labels is not None else 0
        return self.values.numel() * self.values.element_size() + extra

    def _check_indices(self, indices: Any, count: int | None = None) -> torch.Tensor:
        if indices is None:
            raise GradxformError("F³: a micro-batch came without sample indices; the error buffer cannot tell "
                                 "which samples it holds",
                                 hint="wrap the training set with with_indices(dataset) so that it yields "
                                      "(index, x, y)")
        idx = torch.as_tensor(indices)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
            raise GradxformError(f"F³: sample indices must be a 1-d integer tensor, got {idx.dtype} of shape "
                                 f"{tuple(idx.shape)}", hint="yield (index, x, y) with with_indices(dataset)")
        if count is not None and len(idx) != count:
            raise GradxformError(f"F³: {len(idx)} sample indices for a micro-batch of {count}")
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            bad = int(idx.max()) if int(idx.max()) >= len(self) else int(idx.min())
            raise GradxformError(f"F³: sample index {bad} is outside the error buffer of {len(self)} training samples",
                                 hint="index the training set itself (with_indices), not a subset or the test set")
        return idx.long()

    def rows(self, indices: Any) -> torch.Tensor:
        """The stored errors of these samples, (n, C): what the connectors inject for this micro-batch."""
        idx = self._check_indices(indices)
        if self.one_hot:
            e = torch.zeros(len(idx), self.classes, dtype=self.values.dtype)
            e[torch.arange(len(idx)), self.labels[idx]] = self.values[idx]
            return e
        return self.values[idx].clone()

    def write(self, indices: Any, errors: torch.Tensor) -> None:
        """Store errors computed elsewhere (e.g. received from the last stage's rank), (n, C)."""
        idx = self._check_indices(indices, len(errors))
        errors = errors.detach()
        if errors.dim() != 2 or errors.shape[1] != self.classes:
            raise GradxformError(f"F³: error rows of shape {tuple(errors.shape)} for a buffer of {self.classes} "
                                 f"values per sample")
        if self.one_hot:
            errors = errors[torch.arange(len(idx)), self.labels[idx]]
        self.values[idx] = errors.to(self.values.dtype)

    def update(self, indices: Any, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Write the errors of this step's ``outputs`` for its samples; returns them, (n, C)."""
        idx = self._check_indices(indices, len(outputs))
        if self.labels is not None:
            given = _class_indices(targets)
            wrong = (given.to(self.labels.device) != self.labels[idx]).nonzero()
            if len(wrong):
                i = int(wrong[0, 0])
                raise GradxformError(f"F³: sample index {int(idx[i])} holds class {int(self.labels[idx[i]])} "
                                     f"in the error buffer but came with class {int(given[i])}",
                                     hint="the loader's indices must be dataset indices of the training set "
                                          "(with_indices), taken before any shuffling or subsetting")
        errors = error_rows(self.kind, self.loss, outputs, targets)
        self.write(idx, errors)
        return errors

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.kind, "loss": self.loss, "classes": self.classes, "values": self.values.clone()}
        if self.labels is not None:
            state["labels"] = self.labels.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.kind, self.loss, self.classes, tuple(self.values.shape))
        theirs = (state["kind"], state["loss"], state["classes"], tuple(state["values"].shape))
        if mine != theirs:
            raise GradxformError(f"F³: the checkpoint's error buffer (kind, loss, classes, shape) {theirs} does "
                                 f"not match this run's {mine}",
                                 hint="resume with the same error kind, loss and training set")
        self.values = state["values"].to(self.values.dtype).clone()
        if self.labels is not None:
            self.labels = state["labels"].clone()


# ----------------------------------------------------------------------------- indexed samples

class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of (x, y) seen as (index, x, y)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        x, y = self.dataset[i]
        return i, x, y


def with_indices(dataset: Any) -> Any:
    """The dataset as (index, x, y), index = the sample's position in ``dataset``.

    A ``TensorDataset`` of (x, y) becomes a ``TensorDataset`` of (arange(N), x, y), so code that slices
    ``dataset.tensors`` keeps working; any other map-style dataset of (x, y) pairs is wrapped. A dataset
    without ``__len__`` and ``__getitem__`` (an ``IterableDataset``, a generator) cannot name its samples
    and is refused.
    """
    if isinstance(dataset, IndexedDataset) or getattr(dataset, "gx_indexed", False):
        return dataset
    where = type(dataset).__name__
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (hasattr(dataset, "__len__")
                                                                   and hasattr(dataset, "__getitem__")):
        raise GradxformError(f"F³ needs each training sample's index, and a {where} cannot give one "
                             f"(it has no len() and [i])",
                             hint="give a map-style dataset of (x, y), e.g. a TensorDataset, or a "
                                  "module:function returning one")
    if len(dataset) == 0:
        raise GradxformError(f"F³: the training set ({where}) is empty")
    tensors = getattr(dataset, "tensors", None)
    if isinstance(dataset, torch.utils.data.TensorDataset) and tensors is not None:
        if len(tensors) != 2:
            raise GradxformError(f"F³: a TensorDataset of {len(tensors)} tensors; expected (x, y)")
        indexed = torch.utils.data.TensorDataset(torch.arange(len(tensors[0])), *tensors)
        indexed.gx_indexed = True
        return indexed
    first = dataset[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise GradxformError(f"F³: the training set ({where}) yields {type(first).__name__}, not (x, y)",
                             hint="yield (input, target) pairs")
    return IndexedDataset(dataset)


__all__ = ["FeedbackFunction", "feedback", "feedback_backward", "is_feedback_output", "feedback_matrix",
           "feedback_seed", "ERROR_KINDS", "FEEDBACK_INITS", "LOSSES", "check_error_kind", "check_outputs",
           "target_rows", "loss_value", "error_rows", "ErrorBuffer", "IndexedDataset", "with_indices"]
