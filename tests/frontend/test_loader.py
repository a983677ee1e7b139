"""Finding models and example inputs in files; each documented error."""

from __future__ import annotations

import pytest
import torch

from gradxform.errors import ModelLoadError
from gradxform.frontend.loader import load, parse_input_shapes, split_target

from ..conftest import EXAMPLES


def write(tmp_path, text, name="m.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


HEADER = "import torch\nimport torch.nn as nn\n"


def test_discovery_order_model_then_build_model(tmp_path):
    p = write(tmp_path, HEADER + "model = nn.Linear(2, 3)\ndef build_model(): return nn.Linear(2, 5)\n"
              "def example_inputs(): return torch.randn(1, 2)\n")
    loaded = load(str(p))
    assert loaded.attr == "model" and loaded.module.out_features == 3


def test_build_model_and_attr(tmp_path):
    p = write(tmp_path, HEADER + "def build_model(): return nn.Linear(2, 5)\ndef other(): return nn.Linear(2, 7)\n"
              "def example_inputs(m): return (torch.randn(1, m.in_features),)\n")
    assert load(str(p)).module.out_features == 5
    assert load(f"{p}:other").module.out_features == 7


def test_the_single_instance_is_found(tmp_path):
    p = write(tmp_path, HEADER + "net = nn.Linear(2, 3)\ndef example_inputs(): return {'input': torch.randn(1, 2)}\n")
    loaded = load(str(p))
    assert loaded.attr == "net" and set(loaded.kwargs) == {"input"}


def test_missing_file():
    with pytest.raises(ModelLoadError, match="no such file: nowhere.py"):
        load("nowhere.py")


def test_syntax_error_points_at_the_line(tmp_path):
    p = write(tmp_path, HEADER + "def build_model(:\n    pass\n")
    with pytest.raises(ModelLoadError) as e:
        load(str(p))
    assert "syntax error" in str(e.value) and f"{p}:3" in str(e.value)


def test_import_error_names_the_line(tmp_path):
    p = write(tmp_path, HEADER + "import not_a_module_anywhere\n")
    with pytest.raises(ModelLoadError) as e:
        load(str(p))
    assert "ModuleNotFoundError" in str(e.value) and f"{p}:3" in str(e.value)


def test_no_module(tmp_path):
    p = write(tmp_path, HEADER + "x = 1\n")
    with pytest.raises(ModelLoadError, match="no nn.Module found"):
        load(str(p))


def test_several_candidates_are_listed(tmp_path):
    p = write(tmp_path, HEADER + "a = nn.Linear(1, 1)\nb = nn.ReLU()\n")
    with pytest.raises(ModelLoadError) as e:
        load(str(p))
    assert "several nn.Module instances" in str(e.value) and "a, b" in str(e.value)
    assert f"{p}:a" in str(e.value)


def test_unknown_attr_suggests(tmp_path):
    p = write(tmp_path, HEADER + "def resnet18(): return nn.Linear(1, 1)\n")
    with pytest.raises(ModelLoadError, match="did you mean 'resnet18'"):
        load(f"{p}:resnet81")


def test_factory_that_needs_arguments(tmp_path):
    p = write(tmp_path, HEADER + "def make(width): return nn.Linear(width, 1)\n")
    with pytest.raises(ModelLoadError, match="factory taking no arguments"):
        load(f"{p}:make")


def test_no_example_inputs(tmp_path):
    p = write(tmp_path, HEADER + "model = nn.Linear(2, 3)\n")
    with pytest.raises(ModelLoadError, match="no example inputs") as e:
        load(str(p))
    assert "--input-shape" in str(e.value)


def test_input_shapes(tmp_path):
    p = write(tmp_path, HEADER + "model = nn.Linear(2, 3)\n")
    loaded = load(str(p), ["input:[4,2]"])
    assert loaded.kwargs["input"].shape == (4, 2) and loaded.kwargs["input"].dtype == torch.float32
    ids = parse_input_shapes(["ids:[2, 16]:int64"])["ids"]
    assert ids.dtype == torch.int64 and ids.shape == (2, 16)


@pytest.mark.parametrize("spec", ["x:[8,3", "x=[8,3]", "x:[a,b]", ":[1]", "x:[]"])
def test_malformed_input_shape(spec):
    with pytest.raises(ModelLoadError, match="malformed --input-shape") as e:
        parse_input_shapes([spec])
    assert "NAME:[d0,d1,...]" in str(e.value)


def test_unknown_dtype_and_unknown_input_name(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown dtype 'float33'"):
        parse_input_shapes(["x:[1]:float33"])
    p = write(tmp_path, HEADER + "model = nn.Linear(2, 3)\n")
    with pytest.raises(ModelLoadError, match="forward takes: input"):
        load(str(p), ["x:[4,2]"])


def test_split_target():
    assert split_target("a/b.py:resnet50")[1] == "resnet50"
    assert split_target("a/b.py")[1] is None


@pytest.mark.parametrize("name", ["resnet.py", "vit.py", "lm.py", "mlp.py", "gru.py"])
def test_examples_have_build_model_and_inputs(name):
    loaded = load(str(EXAMPLES / name))
    out = loaded.module(*loaded.args, **loaded.kwargs)
    assert out is not None
