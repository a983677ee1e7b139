"""The training losses the runtime uses, and where a model output keeps its predictions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def logits_of(out: Any) -> torch.Tensor:
    """The prediction tensor of a model output: a tensor, a dict's 'logits', or its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (tuple, list)):
        return next(v for v in out if isinstance(v, torch.Tensor))
    raise TypeError(f"cannot find predictions in a {type(out).__name__}")


def classification_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, C) logits, or of (N, T, V) token logits against (N, T) targets."""
    logits = logits_of(out)
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), target.flatten())
    return F.cross_entropy(logits, target)


def per_sample_losses(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Per-sample terms of the training loss (their sum is ``classification_loss``): (N,)."""
    logits = logits_of(out)
    n = logits.shape[0]
    if logits.dim() > 2:
        per = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").reshape(n, -1)
        return per.sum(1) / per.numel()
    return F.cross_entropy(logits, target, reduction="none") / n
