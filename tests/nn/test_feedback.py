"""The F³ feedback connector: its three modes, B as a buffer, the hand-over contract, tracing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gradxform.errors import GradxformError
from gradxform.frontend.tracer import GxTracer
from gradxform.nn.feedback import FeedbackConnector, connectors, feedback_errors


def _pair():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
    conn = FeedbackConnector((3, 4, 4), classes=5, init="trinomial", seed=1, index=0, dtype=torch.float64)
    return block.double(), conn


def test_identity_until_handed_errors_then_e_times_b_or_a_cut():
    block, conn = _pair()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert conn.mode == "identity"
    h = conn(block(x))
    h.sum().backward()                                     # identity: plain backprop
    plain = block[0].weight.grad.clone()
    block.zero_grad()
    e = torch.randn(2, 5, dtype=torch.float64)
    conn.set_error(e)
    assert conn.mode == "feedback"
    out = conn(block(x))
    assert torch.equal(out, block(x))                      # the forward value never changes
    (out * 100).sum().backward()                           # the incoming gradient is dropped
    ref = block(x)
    want = torch.autograd.grad(ref, block[0].weight, (e @ conn.B).reshape(ref.shape))[0]
    torch.testing.assert_close(block[0].weight.grad, want, rtol=0, atol=1e-13)
    assert not torch.allclose(want, plain)
    conn.set_error(None)
    assert conn.mode == "cut" and not conn(block(x)).requires_grad
    conn.clear()
    assert conn.mode == "identity"


def test_eval_no_grad_and_export_see_the_identity():
    block, conn = _pair()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    conn.set_error(torch.randn(2, 5, dtype=torch.float64))
    h = block(x)
    conn.eval()
    assert conn(h) is h
    conn.train()
    with torch.no_grad():
        hn = block(x)
        assert conn(hn) is hn


def test_b_is_a_saved_buffer_not_a_parameter_and_follows_the_dtype():
    conn = FeedbackConnector((7,), classes=3, init="kaiming", seed=2, index=4)
    assert list(conn.parameters()) == [] and set(conn.state_dict()) == {"B"}
    assert conn.B.shape == (3, 7) and conn.B.dtype == torch.float32
    twin = FeedbackConnector((7,), classes=3, init="kaiming", seed=2, index=4)
    assert torch.equal(twin.B, conn.B)                     # the same on every rank
    assert conn.double().B.dtype == torch.float64
    assert "B=3x7" in repr(conn)
    moved = copy.deepcopy(conn)
    moved.set_error(torch.zeros(1, 3, dtype=torch.float64))
    assert moved.mode == "feedback" and conn.mode == "identity"


def test_error_rows_of_the_wrong_shape_are_refused():
    block, conn = _pair()
    with pytest.raises(GradxformError, match=r"error rows must be \(N, 5\), got \(2, 4\)"):
        conn.set_error(torch.zeros(2, 4))
    conn.set_error(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(GradxformError, match="3 error rows for a micro-batch of 2 samples"):
        conn(block(torch.randn(2, 2, 4, 4, dtype=torch.float64)))


def test_feedback_errors_hands_every_connector_the_rows_and_restores_them():
    model = nn.Sequential(nn.Linear(3, 4), FeedbackConnector((4,), 2), nn.Linear(4, 4),
                          FeedbackConnector((4,), 2, index=1))
    found = connectors(model)
    assert len(found) == 2
    found[1].set_error(None)
    e = torch.zeros(5, 2)
    with feedback_errors(model, e) as handed:
        assert handed == found and all(c.mode == "feedback" and c._error is e for c in found)
    assert [c.mode for c in found] == ["identity", "cut"]
    with pytest.raises(RuntimeError), feedback_errors(model, None):
        assert all(c.mode == "cut" for c in found)
        raise RuntimeError("a failing forward")
    assert [c.mode for c in found] == ["identity", "cut"]


def test_the_tracer_keeps_a_connector_whole():
    model = nn.Sequential(nn.Linear(3, 4), FeedbackConnector((4,), 2), nn.Linear(4, 2))
    graph = GxTracer().trace(model)
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2"]
