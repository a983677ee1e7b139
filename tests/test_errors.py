"""One test per error message added for compile options, training, data and artefacts."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from gradxform.compiler import compile_loaded
from gradxform.errors import ExportError, GradxformError, ModelLoadError, PipelineError, TraceError

from .conftest import EXAMPLES, example

DIGITS = f"{EXAMPLES / 'resnet.py'}:digits_resnet"


def test_example_inputs_that_do_not_fit_the_model(tmp_path):
    with pytest.raises(TraceError) as e:
        compile_loaded(example("resnet.py:digits_resnet", input_shapes=["x:[2,3,8,8]"]), "split")
    text = str(e.value)
    assert "running the model on its example inputs failed" in text and "layer conv1" in text
    assert "expected input" in text and "--input-shape" in text


def test_example_inputs_function_that_raises(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch.nn as nn\nmodel = nn.Linear(2, 2)\ndef example_inputs():\n    raise KeyError('x')\n")
    from gradxform.frontend.loader import load

    with pytest.raises(ModelLoadError, match="example_inputs\\(\\) raised KeyError"):
        load(str(path))


def test_split_at_and_stages_disagree():
    with pytest.raises(PipelineError, match="gives 3 stages but stages=4"):
        compile_loaded(example("resnet.py"), "split{at=layer2,layer3,stages=4}", check=False)


def test_split_at_the_first_layer():
    with pytest.raises(PipelineError, match="'conv1' starts the model; nothing comes before it"):
        compile_loaded(example("resnet.py"), "split{at=conv1}", check=False)


@pytest.mark.parametrize("pipeline, message", [
    ("reversible{min_blocks=0}", "min_blocks must be at least 1"),
    ("reversible{drift_every=-1}", "drift_every must be 0 or positive"),
    ("lowrank{rank=0}", "rank must be positive"),
    ("lowrank{cutoff=1.5}", "cutoff must be in"),
])
def test_pass_option_ranges(pipeline, message):
    with pytest.raises(PipelineError, match=message):
        compile_loaded(example("mlp.py"), pipeline, check=False)


@pytest.mark.parametrize("options, message", [
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"lr_schedule": "step"}, "unknown --lr-schedule 'step'"),
    ({"epochs": 0}, "--epochs must be at least 1"),
])
def test_train_config(options, message):
    from gradxform.runtime.train import TrainConfig

    with pytest.raises(GradxformError, match=message):
        TrainConfig(**options).validate()


def test_train_pass_on_an_artefact(cli, tmp_path):
    assert cli("compile", str(EXAMPLES / "mlp.py"), "--pass", "split{stages=2}", "-o", str(tmp_path),
               "--emit", "pt")[0] == 0
    code, _, err = cli("train", str(tmp_path), "--pass", "split{stages=3}", "--out", str(tmp_path / "run"))
    assert code == 2 and "a pipeline (--pass) applies to a model file; this is a compiled artefact" in err


def test_train_nproc_below_one(cli, tmp_path):
    code, _, err = cli("train", DIGITS, "--nproc", "0", "--out", str(tmp_path))
    assert code == 2 and "--nproc must be at least 1" in err


def test_train_model_with_keyword_inputs(cli, tmp_path):
    code, _, err = cli("train", str(EXAMPLES / "lm.py"), "--epochs", "1", "--out", str(tmp_path))
    assert code == 2 and "gradxform train feeds one input tensor per sample" in err


def test_train_batch_larger_than_the_data(cli, tmp_path):
    code, _, err = cli("train", DIGITS, "--batch-size", "5000", "--epochs", "1", "--out", str(tmp_path),
                       "--no-progress")
    assert code == 2 and "fewer samples than --batch-size 5000" in err


def test_data_errors(tmp_path, monkeypatch):
    from gradxform.runtime.data import load_data

    with pytest.raises(GradxformError, match="the model has 3 outputs but digits has 10 classes"):
        load_data("digits", (1, 8, 8), 3)
    with pytest.raises(GradxformError, match="unknown --data 'imagenet'") as e:
        load_data("imagenet", (1, 8, 8), 10)
    assert "digits, synthetic, or module:function" in str(e.value)
    (tmp_path / "baddata.py").write_text("def load():\n    return [1, 2, 3]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "baddata", raising=False)  # another test's baddata.py, same worker
    with pytest.raises(GradxformError, match="--data baddata:load returned list") as e:
        load_data("baddata:load", (1, 8, 8), 10)
    assert "(train_dataset, test_dataset)" in str(e.value)


def test_boundary_with_too_many_tensors_for_one_header():
    from gradxform.runtime.distributed import PointToPoint

    transport = PointToPoint(0, 2, torch.device("cpu"))
    many = tuple(torch.zeros(1, 1, 1, 1, 1, 1) for _ in range(10))  # 10 x (2 + 6) header entries
    with pytest.raises(GradxformError, match="too many tensors/dimensions for one header"):
        transport.send(0, 1, "f", 0, {"activations": many})
    assert not transport.pending  # nothing was posted


def test_artefact_manifest_errors(tmp_path):
    from gradxform.export.artefact import read_manifest

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ExportError, match="has format 99, this gradxform reads 1"):
        read_manifest(tmp_path)
