"""``aux-heads`` on tiny hand-made graphs: Before, Expected, one structural comparison.

What the pass does, read off the tests: the stage graphs do not change (the forward and output stay
the model's); every stage but the last gains a submodule ``aux_head`` built from the shape of the
boundary activation it reads, predicting the model's own classes. ``at=blocks`` first cuts after every
residual block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.nn.heads import AuxHead
from gradxform.passes import compiled_schedule

from .golden import assert_graph, assert_tree, before, run


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


STAGE0 = """
def forward(self, x):
    fc1 = self.fc1(x)
    relu = torch.relu(fc1)
    return (relu,)
"""
STAGE1 = """
def forward(self, relu):
    fc2 = self.fc2(relu)
    relu_1 = torch.relu(fc2)
    fc3 = self.fc3(relu_1)
    return fc3
"""


def _tiny(model: nn.Module, *shape: int):
    # float64: the PassManager holds the forward with heads to the original within 1e-10
    return before(model.double(), torch.randn(*shape, dtype=torch.float64))


def test_a_linear_head_on_the_one_boundary():
    gm, ctx = _tiny(MLP(), 2, 4)

    staged, [_, rec] = run(gm, ctx, "split{stages=2},aux-heads{head=linear}")

    s0, s1 = staged.stages
    assert_graph(s0, STAGE0)  # the graphs are the split's: a head is not part of the forward
    assert_graph(s1, STAGE1)
    assert_tree(s0.aux_head, """
        AuxHead(
          kind=linear, reads output 0 of shape (N, 16)
          (body): Sequential(
            (0): Linear(in_features=16, out_features=3, bias=True)
          )
        )
    """)
    assert s0.aux_head.body[0].weight.dtype == torch.float64  # built in the stage's dtype
    assert not hasattr(s1, "aux_head")  # the last stage has the model's own loss
    assert rec.changed and rec.notes[0].startswith("stage 0: linear head on output 0 (N, 16) -> 3 classes")
    assert compiled_schedule("aux-heads{head=linear}") == "local"  # the schedule the pass compiles for


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


def test_a_head_on_a_convolutional_boundary_pools_before_its_classifier():
    gm, ctx = _tiny(ConvNet(), 2, 3, 8, 8)

    staged, _ = run(gm, ctx, "split{at=c2},aux-heads{head=linear}")

    assert_graph(staged.stages[0], """
        def forward(self, x):
            c1 = self.c1(x)
            relu = torch.relu(c1)
            return (relu,)
    """)
    head = staged.stages[0].aux_head
    assert (head.kind, head.output_index, head.shape, head.classes) == ("linear", 0, (8, 8, 8), 10)
    # BN, pool to 2x2, flatten, classify (types and sizes: BatchNorm's printed form varies across torch versions)
    assert [type(m) for m in head.body] == [nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    bn, pool, _, fc = head.body
    assert (bn.num_features, pool.output_size, fc.in_features, fc.out_features) == (8, 2, 32, 10)


class Residual(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block1, self.block2, self.head = nn.Linear(4, 8), Residual(), Residual(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


def test_at_blocks_cuts_after_every_residual_block():
    gm, ctx = _tiny(TwoBlocks(), 2, 4)

    staged, [rec] = run(gm, ctx, "aux-heads{at=blocks,head=linear}")

    s0, s1, s2 = staged.stages
    assert_graph(s0, """
        def forward(self, x):
            stem = self.stem(x)
            block1_fc1 = self.block1.fc1(stem)
            relu = torch.relu(block1_fc1)
            block1_fc2 = self.block1.fc2(relu)
            add = stem + block1_fc2
            return (add,)
    """)
    assert_graph(s1, """
        def forward(self, add):
            block2_fc1 = self.block2.fc1(add)
            relu_1 = torch.relu(block2_fc1)
            block2_fc2 = self.block2.fc2(relu_1)
            add_1 = add + block2_fc2
            return (add_1,)
    """)
    assert_graph(s2, """
        def forward(self, add_1):
            head = self.head(add_1)
            return head
    """)
    assert [type(getattr(s, "aux_head", None)) for s in staged.stages] == [AuxHead, AuxHead, type(None)]
    assert rec.notes[0] == "split after every residual block: 3 stages"


def test_a_second_run_adds_no_second_head():
    gm, ctx = _tiny(MLP(), 2, 4)

    staged, [_, first, second] = run(gm, ctx, "split{stages=2},aux-heads{head=linear},aux-heads{head=linear}")

    assert first.changed and not second.changed
    assert second.notes[0] == "stage 0 already has a head; left as it is"
    assert second.info["heads"] == []
    assert_graph(staged.stages[0], STAGE0)
    assert [n for n, _ in staged.stages[0].named_children()] == ["fc1", "aux_head"]


def test_one_stage_has_no_boundary_for_a_head():
    gm, ctx = _tiny(MLP(), 2, 4)

    staged, [_, rec] = run(gm, ctx, "split{stages=1},aux-heads")

    assert not rec.changed and rec.notes == ["one stage: no boundary to put a head on"]
    assert not hasattr(staged.stages[0], "aux_head")


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(x)
        return self.c(self.b(self.a(y))) * y


@pytest.mark.xfail(strict=True, reason="between outputs of equal size the head takes the first, here the value the "
                                       "stage only passes through (relu), so the local loss gives the stage's own "
                                       "layers (a, b) no gradient at all")
def test_the_head_reads_what_its_stage_computed_not_a_value_it_passes_through():
    gm, ctx = _tiny(Skip(), 3, 4)

    staged, _ = run(gm, ctx, "split{stages=3,balance=layers},aux-heads{head=linear}")

    s0, s1, _ = staged.stages
    assert_graph(s1, """
        def forward(self, relu, a):
            b = self.b(a)
            return (relu, b)
    """)
    assert (s0.aux_head.output_index, s1.aux_head.output_index) == (1, 1)  # a and b, not relu


@pytest.mark.xfail(strict=True, reason="over the 10% budget the note advises 'try head=linear' even when the head "
                                       "already is linear")
def test_the_advice_over_budget_does_not_name_the_head_in_use():
    gm, ctx = _tiny(MLP(), 2, 4)

    _, [_, rec] = run(gm, ctx, "split{stages=2},aux-heads{head=linear}")

    assert rec.info["share"] > 0.10  # a tiny model: even one Linear head is a large share
    assert "try head=linear" not in rec.notes[-1]
