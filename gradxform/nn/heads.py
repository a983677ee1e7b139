"""Auxiliary classifier heads: the local losses of DGL and the guesses of forward gradients (docs/methods.md §5).

A head reads one stage output and predicts the model's target from it: ``(N, classes)`` logits for a
classifier, or ``(N, T, vocab)`` token logits when the model predicts per token. It is built from
the activation's shape alone:

| activation   | ``linear``                           | ``mlp-sr`` (DGL)                          | ``cnn`` (Fournier et al.)                 |
|--------------|--------------------------------------|-------------------------------------------|-------------------------------------------|
| (N, C, H, W) | BN, avg-pool to 2x2, Linear          | avg-pool to H/2 x W/2 when H >= 8, 3 x     | 1x1 conv to W + BN + ReLU, 3 x (3x3       |
|              |                                      | (1x1 conv + BN + ReLU), avg-pool to 2x2,  | stride-2 conv + BN + ReLU), avg-pool to   |
|              |                                      | 3-layer MLP                               | 2x2, Linear                               |
| (N, T, D)    | LN, mean over T, Linear              | LN, mean over T, 3-layer MLP              | 1x1 conv, 3 x (k3 s2 conv + BN + ReLU)    |
|              |                                      |                                           | over T, mean over T, Linear               |
| (N, D)       | Linear                               | 3-layer MLP                               | as mlp-sr                                 |

With per-token prediction the sequence heads skip the mean over T (and the ``cnn`` head keeps stride 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEADS = ("linear", "mlp-sr", "cnn")


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class _Channels(nn.Module):
    """(N, T, D) <-> (N, D, T) for 1-d convolutions over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def _conv_bn_relu(conv: type, c_in: int, c_out: int, k: int = 1, stride: int = 1) -> list[nn.Module]:
    bn = nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm1d
    return [conv(c_in, c_out, k, stride, padding=k // 2, bias=False), bn(c_out), nn.ReLU()]


def _mlp(d_in: int, width: int, out: int) -> list[nn.Module]:
    return [nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out)]


class AuxHead(nn.Module):
    """A head and where it reads: ``output_index`` picks the stage output it classifies."""

    def __init__(self, body: nn.Module, kind: str, output_index: int, shape: tuple, classes: int, per_token: bool):
        super().__init__()
        self.body = body
        self.kind, self.output_index = kind, output_index
        self.shape, self.classes, self.per_token = tuple(shape), classes, per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, reads output {self.output_index} of shape (N, {', '.join(map(str, self.shape))})"


def build_head(kind: str, shape: tuple, classes: int, width: int = 0, per_token: bool = False) -> nn.Sequential:
    """The head for one sample's activation ``shape`` (without the batch dimension)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head '{kind}'; known: {', '.join(HEADS)}")
    if len(shape) == 3:
        c, h, w = shape
        if kind == "linear":
            return nn.Sequential(nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, classes))
        width = width or 32
        if kind == "mlp-sr":
            pool = [nn.AdaptiveAvgPool2d((max(1, h // 2), max(1, w // 2)))] if min(h, w) >= 8 else []
            layers = pool + _conv_bn_relu(nn.Conv2d, c, width)
            for _ in range(2):
                layers += _conv_bn_relu(nn.Conv2d, width, width)
            return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), *_mlp(4 * width, width, classes))
        layers = _conv_bn_relu(nn.Conv2d, c, width)
        for _ in range(3):
            layers += _conv_bn_relu(nn.Conv2d, width, width, 3, 2)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, classes))
    if len(shape) == 2:
        t, d = shape
        pool = [] if per_token else [_TokenMean()]
        if kind == "linear":
            return nn.Sequential(nn.LayerNorm(d), *pool, nn.Linear(d, classes))
        width = width or 32
        if kind == "mlp-sr":
            return nn.Sequential(nn.LayerNorm(d), *pool, *_mlp(d, width, classes))
        stride = 1 if per_token else 2
        layers = [_Channels(), *_conv_bn_relu(nn.Conv1d, d, width)]
        for _ in range(3):
            layers += _conv_bn_relu(nn.Conv1d, width, width, 3, stride)
        layers.append(_Channels())
        return nn.Sequential(*layers, *pool, nn.Linear(width, classes))
    if len(shape) == 1:
        (d,) = shape
        if kind == "linear":
            return nn.Sequential(nn.Linear(d, classes))
        return nn.Sequential(*_mlp(d, width or 32, classes))
    raise ValueError(f"no head for activations of shape (N, {', '.join(map(str, shape))}): expected (N, C, H, W), "
                     f"(N, T, D) or (N, D)")


def head_flops(head: nn.Module, shape: tuple, batch: int) -> int:
    """FLOPs of one forward through ``head`` for ``batch`` samples (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..state import frozen_buffers

    p = next(head.parameters())
    x = torch.zeros(batch, *shape, dtype=p.dtype, device=p.device)
    mode = head.training
    head.eval()  # a batch of one would make training-mode BatchNorm refuse
    try:
        with frozen_buffers(head), torch.no_grad(), FlopCounterMode(display=False) as counter:
            head(x)
    finally:
        head.train(mode)
    return int(counter.get_total_flops())
