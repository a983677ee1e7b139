"""The Highway-BP engine: scans, exactness at k >= L, BatchNorm, GRU steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from gradxform.nn.highway import HighwayGRU, HighwaySegment
from gradxform.autodiff.highway import suffix_scan, sequential_scan


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), kind=st.sampled_from(["identity", "scalar", "diagonal"]), seed=st.integers(0, 2**16))
def test_parallel_scan_equals_the_sequential_recurrence(n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 3, 5, generator=g, dtype=torch.float64)
    a = {"identity": None, "scalar": torch.full((n,), 0.8, dtype=torch.float64),
         "diagonal": torch.rand(n, 3, 5, generator=g, dtype=torch.float64) * 1.5}[kind]
    ref_a = None if a is None else (a if a.dim() == b.dim() else a.reshape(n, *([1] * (b.dim() - 1))).expand_as(b))
    torch.testing.assert_close(suffix_scan(a, b), sequential_scan(ref_a, b), rtol=1e-12, atol=1e-12)


class Block(nn.Module):
    def __init__(self, width: int = 8, norm: str = "layer"):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm == "layer" else nn.BatchNorm1d(width)
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(self.norm(x)))


def _grads(module, x, exact, k=None):
    for m in module.modules():
        if hasattr(m, "highway_iterations"):
            m.exact = exact
            if k is not None:
                m.highway_iterations = k
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out ** 3).sum()
    return torch.autograd.grad(loss, [x, *module.parameters()])


@pytest.mark.parametrize("kind", ["add", "gamma", "relu", "gelu"])
def test_k_equal_to_depth_is_backprop(kind):
    torch.manual_seed(0)
    layers = 6
    seg = HighwaySegment([Block() for _ in range(layers)], [kind] * layers, iterations=layers).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    exact = _grads(seg, x, exact=True)
    for k in (layers, layers + 3):  # iterations beyond L change nothing
        for a, b in zip(exact, _grads(seg, x, exact=False, k=k)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # fewer iterations approximate: k = 1 differs from the exact gradient
    approx = _grads(seg, x, exact=False, k=1)
    assert max(float((a - b).abs().max()) for a, b in zip(exact, approx)) > 1e-3


def test_zero_iterations_follow_the_residual_path_only():
    """K = I and a loss on the last state: every state's gradient is the output gradient (w^0)."""
    torch.manual_seed(0)
    seg = HighwaySegment([Block() for _ in range(4)], ["add"] * 4, iterations=0).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = seg(x)
    g_out = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g_out)
    torch.testing.assert_close(gx, g_out, rtol=0, atol=0)


def test_identical_blocks_run_as_one_batched_group():
    seg = HighwaySegment([Block(), Block(), Block(8, "batch"), Block()], ["add"] * 4)
    assert seg.group_layers == [[0, 1, 3], [2]]


def test_batchnorm_statistics_update_once_and_gradients_are_exact():
    torch.manual_seed(0)
    seg = HighwaySegment([Block(8, "batch") for _ in range(3)], ["relu"] * 3, iterations=3).double().train()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    before = [b.clone() for b in seg.buffers()]
    exact = _grads(seg, x, exact=True)
    after_exact = [b.clone() for b in seg.buffers()]
    for b, v in zip(seg.buffers(), before):
        b.copy_(v)
    highway = _grads(seg, x, exact=False)
    for a, b in zip(exact, highway):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(after_exact, seg.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_first, layers, unbatched", [(True, 1, False), (False, 2, False), (True, 2, True)])
def test_highway_gru_computes_what_nn_gru_computes(batch_first, layers, unbatched):
    torch.manual_seed(0)
    gru = nn.GRU(6, 8, num_layers=layers, batch_first=batch_first).double()
    x = torch.randn(7, 6, dtype=torch.float64) if unbatched else torch.randn(3, 7, 6, dtype=torch.float64)
    hx = torch.randn(layers, 8, dtype=torch.float64) if unbatched else torch.randn(layers, x.shape[0 if batch_first else 1], 8, dtype=torch.float64)
    ref_out, ref_h = gru(x, hx)
    hw = HighwayGRU.from_gru(gru, iterations=7)
    out, h = hw(x, hx)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)
    assert hw.state_dict().keys() == gru.state_dict().keys()


def test_highway_gru_gradients_equal_backprop_through_nn_gru():
    """k = T steps reproduces the gradient of PyTorch's own GRU kernel (float64), per-step losses included."""
    torch.manual_seed(0)
    gru = nn.GRU(6, 8, num_layers=2, batch_first=True).double()
    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)

    def loss(m):
        out, h = m(x)
        return (out ** 2).sum() + (h ** 3).sum()

    ref = torch.autograd.grad(loss(gru), [x, *gru.parameters()])
    hw = HighwayGRU.from_gru(gru, iterations=10)
    got = torch.autograd.grad(loss(hw), [x, *hw.parameters()])
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    hw.highway_iterations = 2
    approx = torch.autograd.grad(loss(hw), [x, *hw.parameters()])
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(ref), flat(approx), dim=0)
    assert 0.99 < cos < 1 - 1e-12


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_parallel_matrix_scan_equals_the_sequential_recurrence(n, seed):
    """The LSTM's K: 2 x 2 matrices of diagonals on (h, c)."""
    from gradxform.autodiff.highway import matrix_suffix_scan, sequential_matrix_scan

    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 2, 2, 3, 4, generator=g, dtype=torch.float64) * 1.2
    b = torch.randn(n, 2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(matrix_suffix_scan(a, b), sequential_matrix_scan(a, b), rtol=1e-12, atol=1e-12)
    # with a zero first column (an LSTM's K) the scan reduces to a diagonal one on the cell part
    from gradxform.autodiff.highway import reduced_matrix_scan

    a[:, :, 0] = 0
    torch.testing.assert_close(reduced_matrix_scan(a, b), sequential_matrix_scan(a, b), rtol=1e-12, atol=1e-12)


def test_highway_lstm_equals_nn_lstm_forward_and_at_k_equal_steps_backward():
    from gradxform.nn.highway import HighwayLSTM

    torch.manual_seed(0)
    lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True).double()
    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)

    def loss(m):
        out, (h, c) = m(x)
        return (out ** 2).sum() + (h ** 3).sum() + c.sum()

    ref = torch.autograd.grad(loss(lstm), [x, *lstm.parameters()])
    hw = HighwayLSTM.from_lstm(lstm, iterations=10)
    (o1, (h1, c1)), (o2, (h2, c2)) = lstm(x), hw(x)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(ref, torch.autograd.grad(loss(hw), [x, *hw.parameters()])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    hw.highway_iterations = 2
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(ref), flat(torch.autograd.grad(loss(hw), [x, *hw.parameters()])),
                                                dim=0)
    assert 0.99 < cos < 1 - 1e-12
    unbatched = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(hw(unbatched)[0], lstm(unbatched)[0], rtol=1e-12, atol=1e-12)


def test_segment_and_engine_errors():
    from gradxform.nn.highway import make_residual
    from gradxform.autodiff.highway import Group, Segment, _Rerun, gradient_cosines
    from gradxform.autodiff.highway import LSTMResidual, Residual

    with pytest.raises(ValueError, match="one residual kind per block"):
        HighwaySegment([Block(), Block()], ["add"])
    with pytest.raises(ValueError, match="unknown residual kind 'swish'"):
        make_residual("swish")
    with pytest.raises(ValueError, match="the model has no highway segment"):
        gradient_cosines(nn.Linear(2, 2), lambda m: m(torch.ones(1, 2)).sum(), [0])
    blocks = [lambda s: (s[0], s[0], s[0]), lambda s: s]
    seg = Segment(blocks, [LSTMResidual(), Residual()],
                  [Group([0], LSTMResidual(), fn=blocks[0]), Group([1], Residual(), fn=blocks[1])], [], 1)
    with pytest.raises(ValueError, match="a segment mixes matrix and elementwise residuals"):
        _Rerun(seg, torch.zeros(3, 2, 4), None, ())


def test_recurrent_layers_refuse_what_they_cannot_unroll():
    with pytest.raises(TypeError, match="HighwayGRU takes a padded tensor, not a PackedSequence"):
        HighwayGRU.from_gru(nn.GRU(3, 4), 2)(nn.utils.rnn.pack_sequence([torch.randn(2, 3)]))
    with pytest.raises(ValueError, match="bidirectional GRU"):
        HighwayGRU.from_gru(nn.GRU(3, 4, bidirectional=True), 2)
    from gradxform.nn.highway import HighwayLSTM

    with pytest.raises(ValueError, match="LSTM with proj_size"):
        HighwayLSTM.from_lstm(nn.LSTM(3, 4, proj_size=2), 2)
