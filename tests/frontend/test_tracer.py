"""The two tracers and the automatic fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.errors import TraceError
from gradxform.frontend.tracer import trace

from ..conftest import EXAMPLES, example


def test_fx_keeps_layers_as_modules():
    loaded = example("resnet.py")
    traced = trace(loaded.module, loaded.args)
    assert traced.tracer == "fx"
    assert any(n.op == "call_module" and n.target == "layer1.0.conv1" for n in traced.gm.graph.nodes)


def test_lm_falls_back_to_export_and_says_why():
    loaded = example("lm.py")
    traced = trace(loaded.module, loaded.args, loaded.kwargs, source=loaded.path)
    assert traced.tracer == "export"
    (note,) = traced.notes
    assert "symbolic_trace failed" in note and "lm.py:77" in note and "fell back to torch.export" in note
    out = traced.gm(*loaded.args, **loaded.kwargs)
    assert isinstance(out, dict) and out["logits"].shape == (2, 16, 256)
    # the batch and sequence dimensions stay dynamic
    ids = torch.randint(0, 256, (3, 5))
    assert traced.gm(ids, attention_mask=torch.ones(3, 5, dtype=torch.long))["logits"].shape == (3, 5, 256)


def test_forcing_fx_on_the_lm_names_the_line():
    loaded = example("lm.py")
    with pytest.raises(TraceError) as e:
        trace(loaded.module, loaded.args, loaded.kwargs, tracer="fx", source=loaded.path)
    assert "lm.py:77" in str(e.value) and "--tracer export" in str(e.value)


def test_untraceable_model_reports_both_tracers(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # depends on values, not shapes: neither tracer can follow it
                return x * 2
            return x - 1

    with pytest.raises(TraceError) as e:
        trace(DataDependent(), (torch.randn(2, 3),))
    text = str(e.value)
    assert "symbolic_trace failed" in text and "torch.export failed" in text and "torch.cond" in text


def test_unknown_tracer():
    with pytest.raises(TraceError, match="unknown tracer 'jit'"):
        trace(nn.Linear(1, 1), (torch.randn(1, 1),), tracer="jit")


def test_optional_inputs_left_out_keep_their_default():
    class Opt(nn.Module):
        def forward(self, x, scale=None):
            return x if scale is None else x * scale

    traced = trace(Opt(), (torch.randn(2),))
    assert traced.tracer == "fx"
    torch.testing.assert_close(traced.gm(torch.ones(2)), torch.ones(2))


def test_examples_folder_exists():
    assert (EXAMPLES / "resnet.py").exists()
