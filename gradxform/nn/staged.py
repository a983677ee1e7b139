"""A model cut into pipeline stages whose composition equals the original."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class StagedModule(torch.nn.Module):
    """Holds ``stages`` (GraphModules); ``forward`` runs them in order.

    Every stage but the last returns a tuple of tensors that is the next stage's positional input.
    The first stage takes the model's own inputs; the last returns the model's own output structure.
    For a ``torch.export`` graph, whose stages take flat inputs, ``in_spec``/``out_spec`` flatten the
    call's (args, kwargs) and rebuild the output (a dict, a dataclass, ...).
    """

    def __init__(self, stages: list[fx.GraphModule], in_spec: Any = None, out_spec: Any = None):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)
        self.in_spec = in_spec
        self.out_spec = out_spec

    def first(self, *args: Any, **kwargs: Any) -> Any:
        """The first stage's output for a call with the model's own inputs."""
        if self.in_spec is not None:
            import torch.fx._pytree as fx_pytree

            flat = fx_pytree.tree_flatten_spec((list(args), dict(kwargs)), self.in_spec)
            return self.stages[0](*flat)
        return self.stages[0](*args, **kwargs)

    def finish(self, out: Any) -> Any:
        """The model's output structure from the last stage's output."""
        if self.out_spec is not None:
            import torch.utils._pytree as pytree

            return pytree.tree_unflatten(list(out), self.out_spec)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.first(*args, **kwargs)
        for stage in self.stages[1:]:
            out = stage(*out)
        return self.finish(out)

    def __len__(self) -> int:
        return len(self.stages)
