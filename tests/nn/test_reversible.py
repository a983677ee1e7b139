"""Reversible couplings and chains: inversion, exact gradients, O(1) saved memory, the traps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.nn.reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain


def conv_block(c: int, dropout: float = 0.0) -> nn.Module:
    layers = [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
              nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """f(x, *side): what the pass extracts from a residual block."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.f = conv_block(c, dropout)

    def forward(self, x, *side):
        return self.f(x)


def chain(depth: int, coupling, c: int = 4, dtype=torch.float64, dropout: float = 0.0, **kw) -> ReversibleChain:
    torch.manual_seed(0)
    blocks = [Block(c, dropout) for _ in range(depth)]
    return ReversibleChain(blocks, coupling, random=[dropout > 0] * depth, **kw).to(dtype)


COUPLINGS = [LeapfrogCoupling(), LeapfrogCoupling("mean"), MomentumCoupling(0.9)]


def _relative(a, b):
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


@pytest.mark.parametrize("coupling", COUPLINGS, ids=lambda c: c.describe())
def test_round_trip_float64(coupling):
    rev = chain(4, coupling).eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    state = coupling.enter(x)
    with torch.no_grad():
        out = rev.run_steps(state, ())
    back = rev.inverse(*out)
    assert _relative(back, state) < 1e-12


# Budget for float32 reconstruction error at initialisation, conv-BN blocks, eval mode
# (docs/methods.md §1 measured 2e-8 / 4e-7 / 3e-6 / 2.5e-5 for depths 1 / 4 / 16 / 64).
FLOAT32_BUDGET = {1: 1e-6, 4: 1e-5, 16: 1e-4, 64: 1e-3}


@pytest.mark.parametrize("depth", [1, 4, 16, 64])
def test_float32_drift_stays_within_budget(depth):
    rev = chain(depth, LeapfrogCoupling(), c=8, dtype=torch.float32).eval()
    x = torch.randn(4, 8, 8, 8)
    errors = rev.measure_drift(rev.coupling.enter(x), ())
    assert len(errors) == depth
    assert max(errors) < FLOAT32_BUDGET[depth]


def _train_step(rev: ReversibleChain, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    rev.zero_grad()
    x = x.clone().requires_grad_(True)
    out = rev(x)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()
    loss.backward()
    return x.grad, {k: p.grad.clone() for k, p in rev.named_parameters()}


@pytest.mark.parametrize("coupling", COUPLINGS, ids=lambda c: c.describe())
def test_memory_saving_gradients_equal_autograd(coupling):
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    saving = chain(5, coupling).train()
    plain = chain(5, coupling, memory_saving=False).train()
    gx_s, gp_s = _train_step(saving, x)
    gx_p, gp_p = _train_step(plain, x)
    torch.testing.assert_close(gx_s, gx_p, rtol=1e-10, atol=1e-10)
    for k in gp_p:
        torch.testing.assert_close(gp_s[k], gp_p[k], rtol=1e-10, atol=1e-10)
    # BatchNorm running statistics were updated exactly once per step, as with plain autograd
    for (k, a), (_, b) in zip(saving.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b), k


def test_dropout_is_replayed_in_the_recompute():
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    saving = chain(3, LeapfrogCoupling(), dropout=0.3).train()
    plain = chain(3, LeapfrogCoupling(), dropout=0.3, memory_saving=False).train()
    torch.manual_seed(7)
    gx_s, gp_s = _train_step(saving, x)
    torch.manual_seed(7)
    gx_p, gp_p = _train_step(plain, x)
    torch.testing.assert_close(gx_s, gx_p, rtol=1e-10, atol=1e-10)
    for k in gp_p:
        torch.testing.assert_close(gp_s[k], gp_p[k], rtol=1e-10, atol=1e-10)


def test_global_rng_is_not_disturbed_by_backward():
    rev = chain(2, LeapfrogCoupling(), dropout=0.5).train()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    out = rev(x)
    state = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(state, torch.get_rng_state())


def saved_bytes(fn) -> int:
    """Exact bytes autograd saves for backward while running ``fn``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_bytes_do_not_grow_with_depth():
    x = torch.randn(4, 4, 8, 8, dtype=torch.float32, requires_grad=True)
    one_state = x.numel() * x.element_size()
    sizes = {}
    for depth in (1, 4, 16):
        rev = chain(depth, LeapfrogCoupling(), dtype=torch.float32).train()
        sizes[depth] = saved_bytes(lambda: rev(x))
    assert sizes[1] == sizes[4] == sizes[16] == 2 * one_state  # the final two-tensor state, nothing else
    plain = {d: saved_bytes(lambda d=d: chain(d, LeapfrogCoupling(), dtype=torch.float32,
                                              memory_saving=False).train()(x)) for d in (1, 4)}
    assert plain[4] > 3 * plain[1] > 0


def test_inplace_input_mutation_is_isolated():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, *side):
            return self.lin(torch.relu_(x.clone()))

    torch.manual_seed(0)
    blocks = [Inplace() for _ in range(3)]
    rev = ReversibleChain(blocks, LeapfrogCoupling()).double()
    ref = ReversibleChain(blocks, LeapfrogCoupling(), memory_saving=False).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    gx, gp = _train_step(rev, x)
    gx2, gp2 = _train_step(ref, x)
    torch.testing.assert_close(gx, gx2, rtol=1e-10, atol=1e-10)


def test_side_inputs_get_gradients():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, gate):
            return torch.tanh(self.lin(x)) * gate

    torch.manual_seed(0)
    blocks = [Gated() for _ in range(3)]
    gate = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    outs = {}
    for saving in (True, False):
        rev = ReversibleChain(blocks, MomentumCoupling(0.8), memory_saving=saving).double()
        gate.grad = x.grad = None
        rev(x, gate).pow(2).sum().backward()
        outs[saving] = (x.grad.clone(), gate.grad.clone())
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-10, atol=1e-10)


def test_slices_compose_to_the_whole_chain():
    rev = chain(6, LeapfrogCoupling()).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    first, middle, last = rev.slice(0, 2, True, False), rev.slice(2, 5, False, False), rev.slice(5, 6, False, True)
    with torch.no_grad():
        torch.testing.assert_close(last(*middle(*first(x))), rev(x), rtol=0, atol=0)
        # a middle slice is invertible from its output state alone
        mid_in = first(x)
        back = middle.inverse(*middle(*mid_in))
    assert _relative(back, mid_in) < 1e-12


def test_drift_log_in_training():
    rev = chain(3, LeapfrogCoupling(), drift_every=2).train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(4):
        rev(x)
    assert [d["call"] for d in rev.drift_log] == [2, 4]
    assert all(len(d["relative_error"]) == 3 and max(d["relative_error"]) < 1e-10 for d in rev.drift_log)


def test_invalid_coupling_options():
    with pytest.raises(ValueError, match="gamma must be in"):
        MomentumCoupling(1.0)
    with pytest.raises(ValueError, match="merge must be"):
        LeapfrogCoupling("concat")
