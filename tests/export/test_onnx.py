"""ONNX export of whole models and stages, checked in onnxruntime."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.compiler import compile_loaded
from gradxform.export.onnx import export_all, export_onnx
from gradxform.frontend.loader import LoadedModel

from ..conftest import example


@pytest.mark.parametrize("target", ["mlp.py", "lm.py"])
def test_stages_and_model_round_trip(tmp_path, target):
    loaded = example(target)
    staged = compile_loaded(loaded, "split{stages=2}", check=False).module
    results = export_all(staged, loaded.args, loaded.kwargs, tmp_path)
    assert [r.name for r in results] == ["model", "stage0", "stage1"]
    for r in results:
        assert r.ok, r.error
        assert r.max_abs_diff < 1e-4
        assert (tmp_path / f"{r.name}.onnx").exists()


def test_dynamo_exporter(tmp_path):
    loaded = example("mlp.py")
    gm = compile_loaded(loaded, "split{stages=1}", check=False).module.stages[0]
    r = export_onnx(gm, loaded.args, {}, tmp_path / "m.onnx", exporter="dynamo")
    assert r.ok and r.exporter == "dynamo" and r.max_abs_diff < 1e-5


class Bessel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.bessel_j0(self.lin(x))  # no ONNX operator for it in either exporter


def test_failure_is_returned_not_raised(tmp_path):
    r = export_onnx(torch.fx.symbolic_trace(Bessel()), (torch.randn(2, 4),), {}, tmp_path / "b.onnx")
    assert not r.ok and r.path is None
    assert "bessel_j0" in r.error and "torchscript:" in r.error and "dynamo:" in r.error


def test_export_keeps_training_mode_and_buffers(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    loaded = LoadedModel(model, (x,))
    gm = compile_loaded(loaded, "split{stages=1}", check=False).module
    before = model[1].running_mean.clone()
    results = export_all(gm, (x,), {}, tmp_path)
    assert all(r.ok for r in results)
    assert gm.training and torch.equal(model[1].running_mean, before)
