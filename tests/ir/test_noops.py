"""Nodes that compute nothing (assertions, same-dtype conversions, nn.Identity) and dropout that cannot draw."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck

from gradxform.compiler import prepare
from gradxform.frontend.loader import LoadedModel
from gradxform.ir.analysis import analyse
from gradxform.ir.match import draws_random


class AssertingBlock(nn.Module):
    """torchvision's ViT encoder block: it asserts its input's rank before the residual."""

    def __init__(self, d=8):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        return x + self.fc(self.ln(x))


class RMSNorm(nn.Module):
    """Llama's RMSNorm: computes in float32, which for a float32 input export records as an alias."""

    def __init__(self, d=8):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x.to(dtype)


class RMSBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.fc = RMSNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class IdentityShortcut(nn.Module):
    """timm's ConvNeXt block: ``x = drop_path(f(x)) + shortcut(x)`` with both at their identity."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.shortcut, self.drop_path = nn.Identity(), nn.Identity()

    def forward(self, x):
        return self.drop_path(torch.relu(self.fc(x))) + self.shortcut(x)


def _prepared(model, x, tracer="fx"):
    gm, _, notes, _ = prepare(LoadedModel(model, (x,)), tracer)
    return gm, analyse(gm), notes


def test_shape_assertions_do_not_break_a_chain():
    model = nn.Sequential(*(AssertingBlock() for _ in range(3)))
    gm, an, notes = _prepared(model, torch.randn(2, 4, 8))
    assert [len(c) for c in an.chains] == [3]
    assert "removed nodes that compute nothing: 3 assertions" in notes
    FileCheck().check_not("_assert").check_not("dim").run(gm.code)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_same_dtype_conversions_and_their_metadata_checks_do_not_break_a_chain():
    model = nn.Sequential(*(RMSBlock() for _ in range(3)))
    gm, an, notes = _prepared(model, torch.randn(2, 4, 8), "export")
    assert [len(c) for c in an.chains] == [3]
    assert notes[-1].startswith("removed nodes that compute nothing: ") and "conversions" in notes[-1]
    FileCheck().check_not("_assert_tensor_metadata").check_not("aten.to.dtype").run(gm.code)


def test_a_conversion_that_changes_the_dtype_stays():
    model = nn.Sequential(*(RMSBlock() for _ in range(2))).double()
    gm, an, _ = _prepared(model, torch.randn(2, 4, 8, dtype=torch.float64), "export")
    FileCheck().check("aten.to.dtype").run(gm.code)  # float64 -> float32 and back are real work
    assert [len(c) for c in an.chains] == [2]
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_an_identity_shortcut_is_an_identity_skip():
    model = nn.Sequential(IdentityShortcut(), IdentityShortcut())
    gm, an, notes = _prepared(model, torch.randn(3, 8))
    assert "removed nodes that compute nothing: 4 identity layers" in notes
    assert [b.skip for b in an.blocks] == [[], []] and all(b.invertible for b in an.blocks)
    assert [len(c) for c in an.chains] == [2]


class Drop(nn.Module):
    def __init__(self, p=0.0, functional=False):
        super().__init__()
        self.fc, self.p, self.functional = nn.Linear(8, 8), p, functional
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = self.fc(x)
        h = F.dropout(h, self.p, self.training) if self.functional else self.drop(h)
        return x + h


@pytest.mark.parametrize("p, functional, train, tracer, random", [
    (0.0, False, True, "fx", False),      # nn.Dropout(p=0.0): ViTs keep one per block
    (0.1, False, False, "fx", True),      # a module is put in training mode to train: it will draw
    (0.1, True, False, "fx", False),      # F.dropout(training=False) traced from an eval-mode model
    (0.1, True, True, "fx", True),
    (0.1, False, False, "export", False),  # aten.dropout(x, 0.1, train=False)
    (0.1, False, True, "export", True),
    (0.0, False, True, "export", False),
])
def test_dropout_draws_only_when_it_can(p, functional, train, tracer, random):
    model = Drop(p, functional).train(train)
    gm, _, _ = _prepared(model, torch.randn(2, 8), tracer)
    drops = [n for n in gm.graph.nodes if "dropout" in str(n.target) or n.target == "drop"]
    assert len(drops) == 1
    assert draws_random(drops[0], gm) is random


def test_random_ops_draw():
    class Noise(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x) + torch.bernoulli(torch.sigmoid(x))

    gm, _, _ = _prepared(Noise(), torch.randn(2, 3))
    assert [n.name for n in gm.graph.nodes if draws_random(n, gm)] == ["randn_like", "bernoulli"]
