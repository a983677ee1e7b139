"""Growable pairs and block sites, in both tracer spellings, with the reason for every layer left out."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from gradxform.compiler import prepare
from gradxform.frontend.loader import LoadedModel
from gradxform.ir.growth import analyse_growth, block_sites, growable_pairs

from ..conftest import example

DIGITS = ["x:[16,1,8,8]"]


def _graph(loaded, tracer="fx"):
    return prepare(loaded, tracer)[0]


def test_mlp_pairs_chain_through_every_hidden_layer():
    pairs, rejected = growable_pairs(_graph(example("mlp.py")))
    assert [p.name for p in pairs] == ["body.0->body.2", "body.2->body.4", "body.4->body.6", "body.6->head"]
    assert all(p.kind == "linear" and p.activations == ["relu"] and not p.norms for p in pairs)
    assert rejected == {"head": "its output is a model output"}


def _resnet_summary(gm):
    pairs, rejected = growable_pairs(gm)
    return [(p.name, [n.path for n in p.norms], p.activations, p.first.padding, p.second.stride) for p in pairs], rejected


def test_resnet_pairs_are_the_same_in_both_spellings():
    fx_pairs, fx_rejected = _resnet_summary(_graph(example("resnet.py:digits_resnet", input_shapes=DIGITS)))
    ex_pairs, ex_rejected = _resnet_summary(_graph(example("resnet.py:digits_resnet", input_shapes=DIGITS), "export"))
    assert fx_pairs == ex_pairs
    assert fx_pairs[0] == ("layer1.0.conv1->layer1.0.conv2", ["layer1.0.bn1"], ["relu"], (1, 1), (1, 1))
    assert [p[0].split("->")[0] for p in fx_pairs] == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    # the convolutions feeding a residual addition, the stem (read by a block and its skip) and the head
    assert fx_rejected["layer2.0.conv2"] == "its hidden value goes through add (layer2.0)"
    assert fx_rejected["layer2.0.downsample.0"] == "its hidden value goes through add (layer2.0)"
    assert fx_rejected["conv1"].startswith("its hidden value is read by 2 nodes")
    assert fx_rejected["fc"] == "its output is a model output"
    assert set(fx_rejected) == set(ex_rejected)


def test_layers_that_start_no_pair_say_why():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.c = nn.Conv2d(4, 6, 3, padding=1)
            self.ln_in = nn.Linear(6, 8)
            self.ln = nn.LayerNorm(8)
            self.shared = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.c(torch.relu(self.dw(x))))         # depth-wise conv -> conv
            h = self.ln(self.ln_in(h.mean((2, 3))))                 # layer norm between two Linears
            h = self.shared(torch.relu(self.shared(h)))             # one layer called twice
            return self.out(h)

    gm = fx.symbolic_trace(Net())
    pairs, rejected = growable_pairs(gm)
    assert pairs == []
    assert rejected["dw"] == "grouped or depth-wise convolution (groups=4) is not grown"
    assert rejected["c"] == "its hidden value goes through mean (mean)"
    assert rejected["ln_in"] == "a layer norm (ln) mixes the hidden units"
    assert rejected["shared"] == "'shared.weight' is shared with another layer (tied weights do not grow)"
    assert rejected["out"] == "its output is a model output"


def test_a_conv_feeding_a_linear_and_a_branching_value_are_not_pairs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 3, 3)
            self.l = nn.Linear(6, 4)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.l(torch.tanh(self.c(x)))          # a Linear on the width axis of a feature map
            return self.a(h) + self.b(h)

    pairs, rejected = growable_pairs(fx.symbolic_trace(Net()))
    assert not pairs
    assert rejected["c"] == "the next layer l is a linear, not a conv (a reshape between them is not followed)"
    assert rejected["l"] == "its hidden value is read by 2 nodes (a, b), not one layer"


def test_aten_linear_pairs_in_an_exported_transformer():
    gm = _graph(example("lm.py"), "auto")  # a HuggingFace-style model: torch.export
    pairs, rejected = growable_pairs(gm)
    assert [p.name for p in pairs] == [f"layers.{i}.mlp.0->layers.{i}.mlp.2" for i in range(4)]
    assert pairs[0].activations == ["gelu"] and pairs[0].first.weight == "layers.0.mlp.0.weight"
    assert pairs[0].first.module is None                    # parameters reached through get_attr
    assert rejected["layers.0.attn.q_proj"] == "its hidden value goes through view (layers.0.attn)"


def test_block_sites_are_residual_exits():
    gm = _graph(example("resnet.py:digits_resnet", input_shapes=DIGITS))
    sites = block_sites(gm)
    assert [s.name for s in sites] == [f"after layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [s.channels for s in sites[::2]] == [16, 32, 64, 128] and {s.kind for s in sites} == {"conv"}
    vit = analyse_growth(_graph(example("vit.py")))
    assert vit.sites and {s.kind for s in vit.sites} == {"linear"} and vit.sites[0].channels == 64
    assert len(vit.pairs) == 6


def test_analysis_reads_parameter_shapes_without_metadata():
    loaded = LoadedModel(nn.Sequential(nn.Linear(3, 5), nn.SiLU(), nn.Dropout(0.1), nn.Linear(5, 2)), (torch.randn(2, 3),))
    gm = fx.symbolic_trace(loaded.module)          # no meta['val'] at all
    (pair,), _ = growable_pairs(gm)
    assert pair.name == "0->3" and pair.activations == ["silu"] and pair.hidden(gm) == 5
    assert [n.name for n in pair.between] == ["_1", "_2"]
