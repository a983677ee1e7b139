"""``reversible`` on whole models: golden graphs, exact gradients, memory, tracing, export, training."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import gradxform
from gradxform.compiler import compile_loaded
from gradxform.nn import ReversibleChain, StoredInputBlock

from ..conftest import example
from ..nn.test_reversible import saved_bytes


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def test_golden_resnet18():
    module = compile_loaded(example("resnet.py"), "reversible").module
    code = module.code
    # layer1's two blocks become one chain fed by the stem; layer2.0 (projection skip) stays as it was
    FileCheck().check("relu = self.relu(bn1)").check_not("maxpool").check("rev0 = self.rev0(relu)").check(
        "stored0 = self.stored0(rev0)").check("rev1 = self.rev1(stored0)").check("self.stored1(rev1)").check(
        "self.rev2(").check("self.stored2(").check("self.rev3(").check("self.fc(").run(code)
    assert "self.layer" not in code  # every residual block is now a chain or a stored-input block
    stored = [m for m in module.modules() if isinstance(m, StoredInputBlock)]
    assert [m.name for m in stored] == ["layer2.0", "layer3.0", "layer4.0"]
    FileCheck().check("conv1").check("downsample").check("add").check("relu").run(stored[0].block.code)
    chains = [m for m in module.modules() if isinstance(m, ReversibleChain)]
    assert [c.names for c in chains] == [["layer1.0", "layer1.1"], ["layer2.1"], ["layer3.1"], ["layer4.1"]]
    # each block's f reuses the original layers, with the post-addition ReLU moved inside
    FileCheck().check("conv1").check("bn1").check("relu").check("conv2").check("bn2").check(
        "relu").check("return").run(chains[0].blocks[0].code)


def test_report_names_converted_and_skipped_blocks():
    result = compile_loaded(example("resnet.py"), "reversible")
    notes = result.report["passes"][0]["notes"]
    assert any(n.startswith("block layer2.0 not converted: projection skip") for n in notes)
    assert any(n.startswith("rev0: blocks layer1.0, layer1.1 -> leapfrog(merge=first)") for n in notes)
    assert any("predicted activation memory of the whole model" in n for n in notes)
    assert any(n.startswith("stored0: block layer2.0 keeps only its input") for n in notes)
    info = result.report["passes"][0]["info"]
    assert info["chains"][0]["before"] == "3670016*B" and info["chains"][0]["after"] == "524288*B"
    assert [x["blocks"] for x in info["stored_input_blocks"]] == [["layer2.0"], ["layer3.0"], ["layer4.0"]]


def test_second_run_changes_nothing():
    result = compile_loaded(example("vit.py"), "reversible,reversible")
    first, second = result.report["passes"]
    assert first["changed"] and not second["changed"]
    assert second["notes"] == ["no chain of invertible residual blocks found"]


@pytest.mark.parametrize("target, pipeline", [
    ("resnet.py", "reversible"),
    ("vit.py", "reversible{coupling=momentum,gamma=0.8}"),
    ("lm.py", "reversible{merge=mean}"),
])
def test_model_gradients_equal_plain_autograd(target, pipeline):
    grads, buffers = {}, {}
    for saving in ("true", "false"):
        loaded = example(target, double=True)
        sep = "," if "{" in pipeline else "{"
        pipe = pipeline[:-1] + f",memory_saving={saving}}}" if "{" in pipeline else pipeline + sep + \
            f"memory_saving={saving}}}"
        module = compile_loaded(loaded, pipe, check=False).module.train()
        module.zero_grad()
        _logits(module(*loaded.args, **loaded.kwargs)).pow(2).mean().backward()
        grads[saving] = {k: p.grad.clone() for k, p in module.named_parameters()}
        buffers[saving] = {k: b.clone() for k, b in module.named_buffers()}
    assert grads["true"].keys() == grads["false"].keys() and grads["true"]
    for k in grads["true"]:
        torch.testing.assert_close(grads["true"][k], grads["false"][k], rtol=1e-10, atol=1e-10, msg=k)
    for k in buffers["true"]:
        assert torch.equal(buffers["true"][k], buffers["false"][k]), k


def test_stored_input_blocks_keep_the_function_and_its_gradients():
    loaded = example("resnet.py", double=True)
    x = loaded.args[0]
    reference = compile_loaded(example("resnet.py", double=True), "split{stages=1}", check=False).module.train()
    module = compile_loaded(loaded, "reversible{min_blocks=99}", check=True).module.train()
    assert not any(isinstance(m, ReversibleChain) for m in module.modules())
    assert sum(isinstance(m, StoredInputBlock) for m in module.modules()) == 3
    for m in (reference, module):
        m.zero_grad()
        m(x).pow(2).mean().backward()
    ref = dict(reference.named_parameters())
    got = {k: p for k, p in module.named_parameters()}
    by_name = {k.split(".", 2)[-1] if k.startswith("stages.") else k: p for k, p in ref.items()}
    for k, p in got.items():
        key = k.split(".", 2)[-1] if k.startswith("stored") else k
        torch.testing.assert_close(p.grad, by_name[key].grad, rtol=1e-10, atol=1e-12, msg=k)
    ref_buffers = {k.split(".", 2)[-1]: b for k, b in reference.named_buffers()}
    for k, b in module.named_buffers():
        key = k.split(".", 2)[-1] if k.startswith("stored") else k
        assert torch.equal(b, ref_buffers[key]), k


def test_saved_bytes_shrink_on_a_whole_model():
    loaded = example("vit.py")
    x = loaded.args[0]
    original = saved_bytes(lambda: loaded.module.train()(x))
    module = compile_loaded(loaded, "reversible", check=False).module.train()
    reversible = saved_bytes(lambda: module(x))
    assert reversible < original / 4


def test_retracing_keeps_the_chain_a_leaf():
    loaded = example("vit.py")
    module = compile_loaded(loaded, "reversible", check=False).module.train()
    x = loaded.args[0]
    before = saved_bytes(lambda: module(x))
    again = gradxform.trace(module, (x,))
    assert any(n.op == "call_module" and n.target == "rev0" for n in again.graph.nodes)
    assert saved_bytes(lambda: again.train()(x)) == before


def test_onnx_export_of_the_forward_maths(tmp_path):
    loaded = example("resnet.py")
    module = compile_loaded(loaded, "reversible", check=False).module
    r = gradxform.export_onnx(module, loaded.args, tmp_path / "rev.onnx")
    assert r.ok, r.error
    assert r.max_abs_diff < 1e-4


def test_reload_from_an_artefact(tmp_path):
    from ..conftest import EXAMPLES

    module = gradxform.compile(str(EXAMPLES / "resnet.py"), "reversible,split{stages=2}")
    gradxform.save(module, tmp_path)
    again = gradxform.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    module.eval(), again.eval()
    torch.testing.assert_close(again(x), module(x), rtol=0, atol=0)
    assert any(isinstance(m, ReversibleChain) for m in again.modules())


def test_then_split_into_stages():
    loaded = example("lm.py")
    staged = compile_loaded(loaded, "reversible,split{stages=2}").module
    assert len(staged.stages) == 2
    _logits(staged(*loaded.args, **loaded.kwargs)).sum().backward()


def test_invalid_options():
    from gradxform.errors import PipelineError

    with pytest.raises(PipelineError, match="gamma must be in"):
        compile_loaded(example("mlp.py"), "reversible{gamma=1.5}")


def _digits_resnet():
    import importlib.util

    from ..conftest import EXAMPLES

    spec = importlib.util.spec_from_file_location("resnet_example", EXAMPLES / "resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.resnet18(in_channels=1, width=16)


def train_digits(module, epochs: int = 12, seed: int = 0) -> float:
    from torch.utils.data import DataLoader

    from gradxform.runtime.data import digits

    train, test = digits()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * -(-len(train) // 64))
    for _ in range(epochs):
        module.train()
        for x, y in DataLoader(train, batch_size=64, shuffle=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(module(x), y).backward()
            opt.step()
            sched.step()
    module.eval()
    x, y = test.tensors
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_digits_reversible_resnet_matches_ordinary():
    """A reversible ResNet on scikit-learn's digits reaches the ordinary ResNet's accuracy (within 2 points)."""
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(0)
    ordinary = gradxform.compile(_digits_resnet(), "split{stages=1}", example_inputs=(x,))
    torch.manual_seed(0)
    reversible = gradxform.compile(_digits_resnet(), "reversible", example_inputs=(x,))
    acc_plain = train_digits(ordinary)
    acc_rev = train_digits(reversible)
    assert acc_plain > 0.95
    assert acc_rev >= acc_plain - 0.02, (acc_rev, acc_plain)


def test_tanh_gelu_inside_an_mlp_block_converts_the_outer_block():
    import gradxform

    from ..ir.test_analysis import TanhGeluMLP

    torch.manual_seed(0)
    model = torch.nn.Sequential(TanhGeluMLP(), TanhGeluMLP(), TanhGeluMLP()).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    out = gradxform.compile(model, "reversible", example_inputs=(x,))
    chains = [m for m in out.modules() if isinstance(m, ReversibleChain)]
    assert len(chains) == 1 and len(chains[0].blocks) == 3
    # each coupling's residual function is the whole MLP, GELU included
    for block, layer in zip(chains[0].blocks, model):
        torch.testing.assert_close(block(x), layer(x) - x, rtol=0, atol=1e-12)
