"""Residual blocks, chains and cut points found by the analysis."""

from __future__ import annotations

import torch
import torch.nn as nn

from gradxform.compiler import prepare
from gradxform.frontend.loader import LoadedModel
from gradxform.ir.analysis import analyse

from ..conftest import example


def _analyse(target):
    gm, _, _, _ = prepare(example(target))
    return gm, analyse(gm)


def test_resnet18_blocks_and_reasons():
    _, an = _analyse("resnet.py")
    ids = [b.id for b in an.blocks]
    assert ids == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    by_id = {b.id: b for b in an.blocks}
    assert by_id["layer1.0"].invertible and by_id["layer1.0"].post_act is not None  # relu(x + f(x))
    assert not by_id["layer2.0"].invertible
    assert "projection skip through layer2.0.downsample.0 (conv)" in by_id["layer2.0"].reason
    assert [[b.id for b in c] for c in an.chains] == [["layer1.0", "layer1.1"], ["layer2.1"], ["layer3.1"],
                                                     ["layer4.1"]]


def test_resnet50_chains():
    _, an = _analyse("resnet.py:resnet50")
    assert len(an.blocks) == 16
    assert [len(c) for c in an.chains] == [2, 3, 5, 2]  # every stage's first block has a projection skip


def test_vit_pre_ln_sub_blocks_form_one_chain():
    _, an = _analyse("vit.py")
    assert len(an.blocks) == 12 and all(b.invertible for b in an.blocks)
    assert an.blocks[0].id == "blocks.0[0]" and an.blocks[1].id == "blocks.0[1]"
    assert all(b.post_act is None for b in an.blocks)
    assert len(an.chains) == 1 and len(an.chains[0]) == 12


def test_lm_mask_is_not_mistaken_for_a_skip():
    _, an = _analyse("lm.py")
    assert [b.id for b in an.blocks] == [f"layers.{i}[{j}]" for i in range(4) for j in range(2)]
    assert all(b.skip == [] for b in an.blocks)


def test_cut_points_never_inside_blocks_and_carry_tensors():
    gm, an = _analyse("resnet.py")
    inside = {n for b in an.blocks for n in b.nodes if n is not b.exit}
    for c in an.valid_cuts:
        assert an.order[c.index - 1] not in inside
        assert all(isinstance(v.meta["val"], torch.Tensor) for v in c.crossing)
    after = [c.after for c in an.valid_cuts]
    assert "layer1_0_relu_1" in after and "layer1_0_conv2" not in after
    assert str(an.valid_cuts[0].bytes) == "262144*B"  # 64 channels x 32 x 32 x 4 bytes per sample


def test_lm_cuts_carry_the_mask_and_reread_sizes():
    _, an = _analyse("lm.py")
    cut = next(c for c in an.valid_cuts if c.after == "add_4")
    tensors = [v.name for v in cut.crossing if isinstance(v.meta.get("val"), torch.Tensor)]
    assert tensors == ["add_1", "add_4"]  # the causal mask and the residual stream
    assert str(cut.bytes) == "4*B*T**2 + 256*B*T"


def test_projection_skip_with_pooling():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1))
            self.pool = nn.AvgPool2d(2)  # ResNet-D: average-pool, then a 1x1 projection
            self.proj = nn.Conv2d(4, 8, 1)

        def forward(self, x):
            return self.f(x) + self.proj(self.pool(x))

    model = Down()
    gm, _, _, _ = prepare(LoadedModel(model, (torch.randn(2, 4, 8, 8),)))
    (block,) = analyse(gm).blocks
    assert not block.invertible and [n.target for n in block.skip] == ["pool", "proj"]


def test_a_layer_used_twice_allows_cuts_that_record_its_parameters_as_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.mid = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.mid(self.shared(x)))

    gm, _, _, _ = prepare(LoadedModel(Tied(), (torch.randn(2, 4),)))
    an = analyse(gm)
    assert [c.after for c in an.valid_cuts] == ["shared", "mid"]
    assert all(c.tied == ["shared.weight", "shared.bias"] for c in an.valid_cuts)


def test_a_buffer_used_on_both_sides_forbids_the_cut():
    class SharedNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mid = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            return self.norm(self.mid(self.norm(x)))

    gm, _, _, _ = prepare(LoadedModel(SharedNorm(), (torch.randn(3, 4),)))
    an = analyse(gm)
    assert not an.valid_cuts
    assert all(c.reason == "buffer 'norm.running_mean' is used on both sides (a copy per stage would drift apart)"
               for c in an.cuts)


class TanhGeluMLP(nn.Module):
    """x + mlp(ln(x)) with GPT-2's tanh GELU, whose x + 0.044715 x^3 forks from one value too."""

    def __init__(self, d=8):
        super().__init__()
        self.ln, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.fc(self.ln(x))
        h = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.proj(h)


def test_a_residual_match_nested_in_a_block_is_dropped():
    gm, _, _, _ = prepare(LoadedModel(nn.Sequential(TanhGeluMLP(), TanhGeluMLP()), (torch.randn(2, 8),)))
    an = analyse(gm)
    assert [b.id for b in an.blocks] == ["0", "1"]
    assert len(an.chains) == 1 and len(an.chains[0]) == 2
    assert [b.add.name for b, _ in an.rejected] == ["add", "add_3"]
    assert all(why.startswith("nested inside the block ending at add_") for _, why in an.rejected)
    outer = {n.name for b in an.blocks for n in b.nodes}
    assert {"add", "add_3"} <= outer


class Overlap(nn.Module):
    """y1 = a + h(g(a)); y2 = g(a) + m(y1): the second match contains part of the first."""

    def __init__(self, d=8):
        super().__init__()
        self.g, self.h, self.m = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, a):
        b = self.g(a)
        y1 = a + self.h(b)
        return b + self.m(y1)


def test_overlapping_residual_matches_are_both_rejected():
    gm, _, _, _ = prepare(LoadedModel(Overlap(), (torch.randn(2, 8),)))
    an = analyse(gm)
    assert an.blocks == [] and an.chains == []
    assert sorted(why.split(" at ")[0] for _, why in an.rejected) == ["overlaps the block ending", ] * 2
    assert all(not b.invertible for b, _ in an.rejected)
