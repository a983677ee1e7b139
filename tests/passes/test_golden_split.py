"""``split`` on tiny hand-made graphs: Before, the Expected stages, one structural comparison each.

What the pass does, read off the tests: the node list is cut at valid points (never inside a residual
block); each stage is a GraphModule returning the tuple the next stage takes as its inputs; a value
a later stage needs rides through the stages in between; a reversible chain is first unfolded into
one slice per block, passing the coupling's two streams, so a cut may fall between its blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.errors import PipelineError
from gradxform.nn import ReversibleChain, StagedModule

from .golden import assert_graph, before, run


class Residual(nn.Module):
    """x + fc2(relu(fc1(x)))"""

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


TWO_BLOCKS = """
def forward(self, x):
    stem = self.stem(x)
    block1_fc1 = self.block1.fc1(stem)
    relu = torch.relu(block1_fc1)
    block1_fc2 = self.block1.fc2(relu)
    add = stem + block1_fc2
    block2_fc1 = self.block2.fc1(add)
    relu_1 = torch.relu(block2_fc1)
    block2_fc2 = self.block2.fc2(relu_1)
    add_1 = add + block2_fc2
    head = self.head(add_1)
    return head
"""


def _tiny(model: nn.Module, *shape: int):
    # float64: the PassManager then holds the stages to the original within 1e-10
    return before(model.double(), torch.randn(*shape, dtype=torch.float64))


def test_two_stages_cut_between_the_blocks():
    gm, ctx = _tiny(TwoBlocks(), 2, 4)
    assert_graph(gm, TWO_BLOCKS)

    staged, [rec] = run(gm, ctx, "split{stages=2}")

    # flops: stem + block1 against block2 + head is the most even cut outside a block
    assert isinstance(staged, StagedModule) and len(staged.stages) == 2
    s0, s1 = staged.stages
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
            head = self.head(add_1)
            return head
    """)
    # each stage holds only its own layers
    assert [n for n, _ in s0.named_children()] == ["stem", "block1"]
    assert [n for n, _ in s1.named_children()] == ["block2", "head"]
    assert rec.changed and rec.notes[0].startswith("cut after 'add': 1 tensor(s)")


def test_an_explicit_cut_point():
    gm, ctx = _tiny(TwoBlocks(), 2, 4)

    staged, [rec] = run(gm, ctx, "split{at=head}")

    s0, s1 = staged.stages
    assert_graph(s0, TWO_BLOCKS.replace("head = self.head(add_1)\n    return head", "return (add_1,)"))
    assert_graph(s1, """
        def forward(self, add_1):
            head = self.head(add_1)
            return head
    """)
    assert rec.info["cuts"] == ["add_1"]


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(x)
        return self.c(self.b(self.a(y))) * y


def test_a_value_needed_two_stages_later_rides_through_the_middle_stage():
    gm, ctx = _tiny(Skip(), 3, 4)

    staged, _ = run(gm, ctx, "split{stages=3,balance=layers}")

    s0, s1, s2 = staged.stages
    assert_graph(s0, """
        def forward(self, x):
            relu = torch.relu(x)
            a = self.a(relu)
            return (relu, a)
    """)
    assert_graph(s1, """
        def forward(self, relu, a):
            b = self.b(a)
            return (relu, b)
    """)
    assert_graph(s2, """
        def forward(self, relu, b):
            c = self.c(b)
            mul = c * relu
            return mul
    """)


def test_one_stage_is_the_whole_graph():
    gm, ctx = _tiny(TwoBlocks(), 2, 4)

    staged, [rec] = run(gm, ctx, "split{stages=1}")

    # the model becomes a StagedModule (a change of type the runtime relies on), its graph does not
    assert rec.changed and len(staged.stages) == 1
    assert_graph(staged.stages[0], TWO_BLOCKS)


def test_a_second_split_is_refused():
    gm, ctx = _tiny(TwoBlocks(), 2, 4)

    with pytest.raises(PipelineError, match="the model is already split") as e:
        run(gm, ctx, "split{stages=2},split{stages=2}")
    assert "step 2 of pipeline 'split{stages=2},split{stages=2}'" in str(e.value)


class ThreeBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.block1, self.block2, self.block3 = Residual(), Residual(), Residual()

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(self.stem(x)))))


def test_a_reversible_chain_is_unfolded_so_a_cut_can_fall_between_its_blocks():
    gm, ctx = _tiny(ThreeBlocks(), 2, 4)

    staged, [_, rec] = run(gm, ctx, "reversible,split{stages=3}")

    # rev0 (three blocks) becomes rev0_b0 .. rev0_b2; between slices travel the two streams (a, b)
    s0, s1, s2 = staged.stages
    assert_graph(s0, """
        def forward(self, x):
            stem = self.stem(x)
            rev0_b0 = self.rev0_b0(stem)
            getitem = rev0_b0[0]
            getitem_1 = rev0_b0[1]
            return (getitem, getitem_1)
    """, layers={"stem": nn.Linear, "rev0_b0": ReversibleChain})
    assert_graph(s1, """
        def forward(self, a, b):
            rev0_b1 = self.rev0_b1(a, b)
            getitem_2 = rev0_b1[0]
            getitem_3 = rev0_b1[1]
            return (getitem_2, getitem_3)
    """, layers={"rev0_b1": ReversibleChain})
    assert_graph(s2, """
        def forward(self, a, b):
            rev0_b2 = self.rev0_b2(a, b)
            head = self.head(rev0_b2)
            return head
    """, layers={"rev0_b2": ReversibleChain, "head": nn.Linear})
    # the first slice enters the chain (one tensor in), the last leaves it (one tensor out)
    assert [(c.names, c.enter, c.exit) for c in (s0.rev0_b0, s1.rev0_b1, s2.rev0_b2)] == [
        (["block1"], True, False), (["block2"], False, False), (["block3"], False, True)]
    # only the middle stage is slices alone: it is invertible, which PETRA needs
    assert not hasattr(s0, "inverse") and hasattr(s1, "inverse") and not hasattr(s2, "inverse")
    a, b = s0(ctx.args[0])
    back = s1.inverse(*s1(a, b))
    torch.testing.assert_close(back, (a, b), rtol=1e-12, atol=1e-12)
    assert rec.notes[0].startswith("cut after 'getitem_1': 2 tensor(s)")
