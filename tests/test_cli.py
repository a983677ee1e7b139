"""The CLI as a user runs it (subprocess), and one test per documented error message."""

from __future__ import annotations

import json

import pytest

from .conftest import EXAMPLES, run_cli

pytestmark = pytest.mark.slow


def test_compile_writes_every_artefact(tmp_path):
    out = tmp_path / "out"
    r = run_cli("compile", "examples/resnet.py", "--pass", "split{stages=4}", "-o", str(out))
    assert r.returncode == 0, r.stderr
    for name in ("manifest.json", "weights.pt", "graph.svg", "graph.dot", "report.json", "model.onnx",
                 "stage0.onnx", "stage3.onnx", "source/resnet.py", "code/stage2.py"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert [o["ok"] for o in report["onnx"]] == [True] * 5
    assert all(o["max_abs_diff"] < 1e-4 for o in report["onnx"])
    split = report["passes"][0]
    assert split["name"] == "split" and len(split["info"]["stages"]) == 4
    # the terminal summary: per pass time, nodes, params, FLOPs; per stage share of the cost
    assert "split{stages=4}" in r.stdout and "FLOPs" in r.stdout and "share" in r.stdout
    assert "stage3" in r.stdout and "max|Δ|" in r.stdout


def test_compile_lm_through_export_with_input_shape(tmp_path):
    r = run_cli("compile", "examples/lm.py", "--pass", "split{stages=2}", "-o", str(tmp_path),
                "--emit", "json,pt", "--input-shape", "input_ids:[3,12]:int64")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tracer"] == "export" and report["symbols"] == {"B": 3, "T": 12}
    assert "fell back to torch.export" in r.stdout


def test_passes_lists_and_shows_one():
    r = run_cli("passes")
    assert r.returncode == 0 and "split" in r.stdout and "balance: flops|params|layers|time = flops" in r.stdout
    r = run_cli("passes", "split")
    assert r.returncode == 0 and "options:" in r.stdout and "optimally balanced" in r.stdout


def test_inspect_prints_blocks_cuts_and_symbolic_costs():
    r = run_cli("inspect", "examples/resnet.py")
    assert r.returncode == 0, r.stderr
    assert "residual blocks: 8 found, 5 invertible" in r.stdout
    assert "no: projection skip through layer2.0.downsample.0 (conv)" in r.stdout
    # 13: the stem's nn.Identity (maxpool at 32x32) is removed, and with it the cut after it
    assert "valid stage cut points: 13" in r.stdout and "262144*B" in r.stdout
    assert "cost per segment (symbolic in B" in r.stdout


def test_inspect_lm_json_has_sequence_symbol():
    r = run_cli("inspect", "examples/lm.py", "--json")
    info = json.loads(r.stdout)
    assert "T" in info["symbols"] and "T**2" in info["total"]["flops"]


def test_export_from_an_artefact(tmp_path):
    assert run_cli("compile", "examples/mlp.py", "--pass", "split{stages=2}", "-o", str(tmp_path),
                   "--emit", "pt").returncode == 0
    r = run_cli("export", str(tmp_path), "--emit", "onnx,svg")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "stage1.onnx").exists() and (tmp_path / "graph.svg").exists()


# --- bad input: one test per message, in-process for speed -------------------------------------

def _model_file(tmp_path, body):
    path = tmp_path / "model.py"
    path.write_text("import torch\nimport torch.nn as nn\n" + body)
    return str(path)


def _error(cli, *args):
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert "\nerror: " in "\n" + err and "Traceback" not in err
    return err


def test_error_missing_file(cli, tmp_path):
    assert "no such file: nope.py" in _error(cli, "compile", "nope.py", "--pass", "split", "-o", str(tmp_path))


def test_error_syntax(cli, tmp_path):
    f = _model_file(tmp_path, "def build_model(:\n")
    err = _error(cli, "compile", f, "--pass", "split", "-o", str(tmp_path / "o"))
    assert "syntax error" in err and "model.py:3" in err


def test_error_no_module(cli, tmp_path):
    f = _model_file(tmp_path, "x = 1\n")
    assert "no nn.Module found" in _error(cli, "inspect", f)


def test_error_several_candidates(cli, tmp_path):
    f = _model_file(tmp_path, "a = nn.Linear(1, 1)\nb = nn.Linear(1, 1)\n")
    err = _error(cli, "inspect", f)
    assert "several nn.Module instances" in err and "a, b" in err


def test_error_untraceable(cli, tmp_path):
    f = _model_file(tmp_path, "class M(nn.Module):\n    def forward(self, x):\n        if x.sum() > 0:\n"
                              "            return x\n        return -x\nmodel = M()\n"
                              "def example_inputs(): return torch.randn(2, 2)\n")
    err = _error(cli, "compile", f, "--pass", "split", "-o", str(tmp_path / "o"))
    assert "could not trace the model" in err and "model.py:5" in err and "torch.export failed" in err


def test_error_unknown_pass(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "splitt{stages=2}", "-o", str(tmp_path))
    assert "unknown pass 'splitt'" in err and "did you mean 'split'" in err


def test_error_unknown_option(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split{stagse=2}", "-o", str(tmp_path))
    assert "no option 'stagse'" in err and "did you mean 'stages'" in err


def test_error_ill_typed_option(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split{stages=many}", "-o", str(tmp_path))
    assert "option 'stages' of 'split': expected an integer, got 'many'" in err


def test_error_more_stages_than_cuts(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split{stages=40}", "-o", str(tmp_path),
                 "--emit", "json")
    assert "cannot cut into 40 stages" in err and "use fewer stages" in err


def test_error_malformed_input_shape(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split", "-o", str(tmp_path), "--input-shape", "x:8,64")
    assert "malformed --input-shape 'x:8,64'" in err


def test_error_unwritable_output(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split", "-o", str(blocker / "sub"))
    assert "cannot write to output folder" in err


def test_error_unknown_emit(cli, tmp_path):
    err = _error(cli, "compile", "examples/mlp.py", "--pass", "split", "-o", str(tmp_path), "--emit", "png")
    assert "unknown --emit kind 'png'" in err


def test_onnx_failure_keeps_other_artefacts(cli, tmp_path):
    f = _model_file(tmp_path, "class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                              "        self.lin = nn.Linear(4, 4)\n"
                              "    def forward(self, x):\n        return torch.special.bessel_j0(self.lin(x))\n"
                              "model = M()\ndef example_inputs(): return torch.randn(2, 4)\n")
    out = tmp_path / "o"
    code, stdout, _ = cli("compile", f, "--pass", "split{stages=1}", "-o", str(out))
    assert code == 1
    assert (out / "weights.pt").exists() and (out / "graph.svg").exists() and (out / "report.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert not report["onnx"][0]["ok"] and "bessel_j0" in report["onnx"][0]["error"]
    assert "FAILED" in stdout and "bessel_j0" in stdout


def test_examples_dir_is_the_one_used():
    assert (EXAMPLES / "lm.py").exists()


def test_compile_reversible_reports_predicted_memory(tmp_path):
    r = run_cli("compile", "examples/resnet.py", "--pass", "reversible", "-o", str(tmp_path), "--emit", "json,pt")
    assert r.returncode == 0, r.stderr
    assert "rev0: blocks layer1.0, layer1.1 -> leapfrog(merge=first)" in r.stdout
    assert "predicted activation memory of the whole model" in r.stdout
    assert "block layer2.0 not converted: projection skip" in r.stdout
