"""Every pipeline on models nobody on the project wrote: HuggingFace GPT-2, Llama and BERT built from
tiny configs, timm's ConvNeXt and ResNet built without weights (nothing is downloaded).

For each model x pipeline: the compile works and does real work where the architecture allows it,
a function-preserving pipeline computes what the model computes (float64, 1e-8), and one training
step on the compiled module gives a finite gradient for every parameter. Where an architecture
leaves a pass nothing to do (post-LN BERT has no run of two residual blocks for Highway-BP), the
test checks that the report says so.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch


def _torchvision_without_its_kernels() -> None:
    """Let torchvision import when its compiled kernels cannot load.

    timm needs torchvision, and transformers imports it when it is installed. PyPI's torchvision
    wheels link CUDA libraries; beside the CPU build of torch its kernel library does not load,
    and its import then fails registering fake kernels for two ops it never defined (nms, qnms).
    Declaring those two ops lets it import; neither these tests nor the models use them.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libraries = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    try:
        torch.ops.load_library(libraries[0])
        return
    except (OSError, IndexError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_without_its_kernels.library = lib  # type: ignore[attr-defined]  # kept alive


_torchvision_without_its_kernels()
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import gradxform  # noqa: E402
from gradxform.nn import ReversibleChain, StagedModule  # noqa: E402
from gradxform.nn.heads import AuxHead  # noqa: E402
from gradxform.nn.highway import HighwaySegment  # noqa: E402

BATCH, TOKENS = 3, 8


def _ids(vocab: int = 64) -> dict:
    return {"input_ids": torch.randint(0, vocab, (BATCH, TOKENS))}


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), (), _ids()


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg), (), _ids()


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    return transformers.BertForSequenceClassification(cfg), (), _ids()


def convnext():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 2, 1),
                              dims=(8, 16, 32, 64))
    return model, (torch.randn(BATCH, 3, 32, 32),), {}


def resnet():
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, (3, 1, 1, 1), num_classes=10, channels=(8, 16, 32, 64), stem_width=8)
    return model, (torch.randn(BATCH, 3, 32, 32),), {}


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "convnext": convnext, "resnet": resnet}
PIPELINES = ["split{stages=2}", "reversible", "petra{stages=2}", "lowrank{rank=0.25}", "highway{iterations=2}",
             "dgl{stages=2}"]
PRESERVING = {"split{stages=2}", "highway{iterations=2}", "dgl{stages=2}"}
# cells where the architecture leaves the pass nothing to convert: the one line the report gives
NOTHING_TO_DO = {
    ("bert", "highway{iterations=2}"):
        # post-LN: LayerNorm after every addition ends each run of residual blocks after one block
        "highway changed nothing: blocks bert.encoder.layer.0.attention not converted: fewer than min_layers=2",
}


def _build(name: str):
    torch.manual_seed(0)
    model, args, kwargs = MODELS[name]()
    model = model.double().eval()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    return model, args, kwargs


def _logits(out):
    return out["logits"] if not isinstance(out, torch.Tensor) else out


def _modules(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def _real_work(name: str, pipeline: str, out, report) -> None:
    record = report["passes"]
    if (name, pipeline) in NOTHING_TO_DO:
        assert record[-1]["unchanged"].startswith(NOTHING_TO_DO[name, pipeline])
        return
    assert all(r["changed"] for r in record), [r["unchanged"] for r in record]
    kind = pipeline.split("{")[0]
    if kind in ("split", "petra", "dgl"):
        assert isinstance(out, StagedModule) and len(out.stages) == 2
    if kind in ("reversible", "petra"):
        assert _modules(out, ReversibleChain)
    if kind == "highway":
        assert _modules(out, HighwaySegment)
    if kind == "lowrank":
        assert record[0]["info"]["layers"] and record[0]["params"][1] < record[0]["params"][0]
    if kind == "dgl":
        assert isinstance(out.stages[0].aux_head, AuxHead)


def _loss(out, module, args, kwargs):
    """The output's loss, plus each stage's local loss from its auxiliary head (dgl)."""
    loss = _logits(out(*args, **kwargs)).pow(2).mean()
    if isinstance(out, StagedModule) and any(hasattr(s, "aux_head") for s in out.stages):
        x = out.first(*args, **kwargs)
        for before, stage in zip(out.stages, out.stages[1:]):
            head = getattr(before, "aux_head", None)
            if head is not None:
                loss = loss + head(x[head.output_index]).pow(2).mean()
            x = stage(*x)
    return loss


# torch.export with a dynamic batch and sequence length takes seconds on the decoder LMs
SLOW = {"gpt2", "llama"}


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_pipeline_on_a_real_model(name, pipeline):
    model, args, kwargs = _build(name)
    want = _logits(model(*args, **kwargs))
    out = gradxform.compile(model, pipeline, example_inputs=args, example_kwargs=kwargs)
    _real_work(name, pipeline, out, out.gx_report)
    if pipeline in PRESERVING:
        torch.testing.assert_close(_logits(out(*args, **kwargs)), want, rtol=1e-8, atol=1e-8)
    out.train()
    _loss(out, model, args, kwargs).backward()
    params = [(n, p) for n, p in out.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"


@pytest.mark.slow
def test_gpt2_split_copies_the_tied_embedding_into_both_stages():
    model, args, kwargs = _build("gpt2")
    out = gradxform.compile(model, "split{stages=2}", example_inputs=args, example_kwargs=kwargs)
    assert [[j for j, _ in group] for group in out.tied] == [[0, 1]]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_timm_convnext_stages_are_its_own_not_a_staged_model():
    model, args, kwargs = _build("convnext")
    out = gradxform.compile(model, "reversible", example_inputs=args)
    assert not isinstance(out, StagedModule) and hasattr(out, "stages")
    chains = _modules(out, ReversibleChain)
    # ConvNeXt's shortcut is an nn.Identity: every block is an identity-skip block; the downsampling
    # layers between the stages end the chains (depths 1, 1, 2, 1)
    assert sorted(len(c.blocks) for c in chains) == [1, 1, 1, 2]


@pytest.mark.slow
def test_a_model_returning_a_kv_cache_gets_a_hint():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, use_cache=True)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(gradxform.GradxformError) as e:
        gradxform.compile(model, "split{stages=2}", example_kwargs=_ids())
    assert "use_cache=False" in e.value.hint
