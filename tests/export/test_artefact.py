"""Saving and reloading compiled artefacts."""

from __future__ import annotations

import json

import pytest
import torch

import gradxform
from gradxform.compiler import compile_loaded
from gradxform.errors import ExportError

from ..conftest import EXAMPLES, example


@pytest.mark.parametrize("target", ["resnet.py", "lm.py"])
def test_save_load_round_trip(tmp_path, target):
    loaded = example(target)
    module = compile_loaded(loaded, "split{stages=2}", check=False).module
    # train a little so the saved weights differ from the originals
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01)
    module.eval()
    gradxform.save(module, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["pipeline"] == "split{stages=2}" and manifest["stages"] == 2
    assert (tmp_path / "code" / "stage1.py").exists()
    again = gradxform.load(tmp_path).eval()
    want = module(*loaded.args, **loaded.kwargs)
    got = again(*loaded.args, **loaded.kwargs)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_api_compile_from_a_path_and_save(tmp_path):
    module = gradxform.compile(str(EXAMPLES / "mlp.py"), "split{stages=2}")
    assert module.gx_report["passes"][0]["name"] == "split"
    gradxform.save(module, tmp_path)
    assert len(gradxform.load(tmp_path).stages) == 2


def test_in_memory_model_cannot_be_saved(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module = gradxform.compile(net, "split{stages=1}", example_inputs=(torch.randn(1, 2),))
    with pytest.raises(ExportError, match="needs to know how to rebuild the model"):
        gradxform.save(module, tmp_path)


def test_changed_source_is_refused(tmp_path):
    module = compile_loaded(example("mlp.py"), "split{stages=2}", check=False).module
    gradxform.save(module, tmp_path)
    src = tmp_path / "source" / "mlp.py"
    src.write_text(src.read_text() + "\n# edited\n")
    with pytest.raises(ExportError, match="differs from the file the artefact was compiled from"):
        gradxform.load(tmp_path)


def test_not_an_artefact(tmp_path):
    with pytest.raises(ExportError, match="not a gradxform artefact"):
        gradxform.load(tmp_path)


def test_tensor_files_load_without_pickled_code(tmp_path):
    module = compile_loaded(example("mlp.py"), "split{stages=2}", check=False).module
    gradxform.save(module, tmp_path)
    for name in ("weights.pt", "original.pt", "inputs.pt"):
        torch.load(tmp_path / name, weights_only=True)  # raises if anything but tensors/containers
