"""``lowrank`` on tiny hand-made graphs: Before, Expected, one structural comparison.

What the pass does, read off the tests: with the fx tracer a factored layer keeps its place and its
name (``self.fc2`` now calls a LowRankLinear ``b(a(x))``), so the graph is unchanged and only the
layer tree differs; with the export tracer the ``aten.linear`` node and the get_attr nodes of its
dense weight become one call to a new ``lowrank<i>`` layer. The first and last layers are kept, and
a layer is factored only where the rank saves parameters and FLOPs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.nn.lowrank import LowRankConv2d, LowRankLinear, USVLinear

from .golden import assert_graph, assert_tree, before, run


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


MLP_CODE = """
def forward(self, x):
    fc1 = self.fc1(x)
    relu = torch.relu(fc1)
    fc2 = self.fc2(relu)
    relu_1 = torch.relu(fc2)
    fc3 = self.fc3(relu_1)
    return fc3
"""


def test_the_middle_linear_is_factored_in_place():
    gm, ctx = before(MLP(), torch.randn(2, 4))
    dense = gm.fc2.weight.detach().clone()
    assert_graph(gm, MLP_CODE, layers={"fc1": nn.Linear, "fc2": nn.Linear, "fc3": nn.Linear})

    module, [rec] = run(gm, ctx, "lowrank{rank=2}")

    assert_graph(module, MLP_CODE, layers={"fc1": nn.Linear, "fc2": LowRankLinear, "fc3": nn.Linear})
    assert_tree(module.fc2, """
        LowRankLinear(
          (a): Linear(in_features=16, out_features=2, bias=False)
          (b): Linear(in_features=2, out_features=16, bias=True)
        )
    """)
    # b(a(x)) is the best rank-2 approximation of the dense weight (Eckart-Young)
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(module.fc2.b.weight @ module.fc2.a.weight, (u[:, :2] * s[:2]) @ vh[:2])
    assert rec.changed and rec.params == (403, 211)
    assert rec.notes == ["fc1 not factored: first or last layer (keep=first,last)",
                         rec.notes[1],
                         "fc3 not factored: first or last layer (keep=first,last)"]
    assert rec.notes[1].startswith("fc2: rank 2 of 16 (factor), parameters 272 -> 80")


def test_through_the_export_tracer_the_aten_linear_becomes_a_layer_call():
    gm, ctx = before(MLP(), torch.randn(2, 4), tracer="export")

    module, [rec] = run(gm, ctx, "lowrank{rank=2}")

    assert_graph(module, """
        def forward(self, x):
            x, = fx_pytree.tree_flatten_spec(([x], {}), self._in_spec)
            fc1_weight = self.fc1.weight
            fc1_bias = self.fc1.bias
            fc3_weight = self.fc3.weight
            fc3_bias = self.fc3.bias
            linear = torch.ops.aten.linear.default(x, fc1_weight, fc1_bias)
            relu = torch.ops.aten.relu.default(linear)
            lowrank0 = self.lowrank0(relu)
            relu_1 = torch.ops.aten.relu.default(lowrank0)
            linear_2 = torch.ops.aten.linear.default(relu_1, fc3_weight, fc3_bias)
            return pytree.tree_unflatten((linear_2,), self._out_spec)
    """, layers={"lowrank0": LowRankLinear})
    # the dense weight is gone, not left behind as a parameter nobody reads
    assert not hasattr(module.fc2, "weight") and not hasattr(module.fc2, "bias")
    assert rec.params == (403, 211)  # as with the fx tracer


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_a_convolution_becomes_k_by_k_to_rank_then_one_by_one():
    gm, ctx = before(Convs(), torch.randn(2, 3, 8, 8))

    module, _ = run(gm, ctx, "lowrank{rank=4}")

    assert_graph(module, """
        def forward(self, x):
            c1 = self.c1(x)
            relu = torch.relu(c1)
            c2 = self.c2(relu)
            relu_1 = torch.relu(c2)
            c3 = self.c3(relu_1)
            return c3
    """, layers={"c1": nn.Conv2d, "c2": LowRankConv2d, "c3": nn.Conv2d})
    assert_tree(module.c2, """
        LowRankConv2d(
          (first): Conv2d(16, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
          (second): Conv2d(4, 16, kernel_size=(1, 1), stride=(1, 1))
        )
    """)


def test_usv_mode_trains_s_and_freezes_u_and_v():
    gm, ctx = before(MLP(), torch.randn(2, 4))

    module, _ = run(gm, ctx, "lowrank{rank=2,mode=usv}")

    assert_graph(module, MLP_CODE, layers={"fc1": nn.Linear, "fc2": USVLinear, "fc3": nn.Linear})
    layer = module.fc2
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {"s": (2, 2), "bias": (16,)}
    assert {n: tuple(b.shape) for n, b in layer.named_buffers()} == {"u": (16, 2), "v": (16, 2)}


def test_a_second_run_changes_nothing():
    gm, ctx = before(MLP(), torch.randn(2, 4))

    module, [first, second] = run(gm, ctx, "lowrank{rank=2},lowrank{rank=2}")

    assert first.changed and not second.changed
    assert second.notes == ["fc1 not factored: first or last layer (keep=first,last)",
                            "fc3 not factored: first or last layer (keep=first,last)", "no layer factored"]
    assert_graph(module, MLP_CODE, layers={"fc1": nn.Linear, "fc2": LowRankLinear, "fc3": nn.Linear})


def test_a_rank_that_saves_nothing_factors_nothing():
    gm, ctx = before(MLP(), torch.randn(2, 4))

    module, [rec] = run(gm, ctx, "lowrank{rank=8}")

    # 16 x 16: rank r costs r (16 + 16) parameters, which saves only for r < 8
    assert not rec.changed
    assert rec.notes[1:] == ["fc2 not factored: rank 8 saves nothing (needs < 8)", "fc3 not factored: first or last "
                             "layer (keep=first,last)", "no layer factored"]
    assert_graph(module, MLP_CODE, layers={"fc1": nn.Linear, "fc2": nn.Linear, "fc3": nn.Linear})


class SharedMiddle(nn.Module):
    """One layer applied twice: its weight is shared by two uses."""

    def __init__(self):
        super().__init__()
        self.fc1, self.mid, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.fc1(x))))
        return self.fc3(torch.relu(self.mid(h)))


def test_a_layer_used_twice_stays_one_factored_layer():
    gm, ctx = before(SharedMiddle(), torch.randn(2, 4))

    module, [rec] = run(gm, ctx, "lowrank{rank=2}")

    assert_graph(module, """
        def forward(self, x):
            fc1 = self.fc1(x)
            relu = torch.relu(fc1)
            mid = self.mid(relu)
            relu_1 = torch.relu(mid)
            mid_1 = self.mid(relu_1)
            relu_2 = torch.relu(mid_1)
            fc3 = self.fc3(relu_2)
            return fc3
    """, layers={"fc1": nn.Linear, "mid": LowRankLinear, "fc3": nn.Linear})
    assert rec.params == (403, 211)


@pytest.mark.xfail(strict=True, reason="export tracer: each aten.linear reading the shared weight is factored on "
                                       "its own, into lowrank0 and lowrank1: the tie is lost and the model has "
                                       "291 parameters where the fx spelling has 211")
def test_a_layer_used_twice_stays_one_factored_layer_through_the_export_tracer():
    gm, ctx = before(SharedMiddle(), torch.randn(2, 4), tracer="export")

    module, [rec] = run(gm, ctx, "lowrank{rank=2}")

    assert_graph(module, """
        def forward(self, x):
            x, = fx_pytree.tree_flatten_spec(([x], {}), self._in_spec)
            fc1_weight = self.fc1.weight
            fc1_bias = self.fc1.bias
            fc3_weight = self.fc3.weight
            fc3_bias = self.fc3.bias
            linear = torch.ops.aten.linear.default(x, fc1_weight, fc1_bias)
            relu = torch.ops.aten.relu.default(linear)
            lowrank0 = self.lowrank0(relu)
            relu_1 = torch.ops.aten.relu.default(lowrank0)
            lowrank0_1 = self.lowrank0(relu_1)
            relu_2 = torch.ops.aten.relu.default(lowrank0_1)
            linear_3 = torch.ops.aten.linear.default(relu_2, fc3_weight, fc3_bias)
            return pytree.tree_unflatten((linear_3,), self._out_spec)
    """, layers={"lowrank0": LowRankLinear})
    assert rec.params == (403, 211)
