"""One name for each layer, whichever tracer wrote the graph.

``torch.fx.symbolic_trace`` keeps standard layers as ``call_module`` nodes (``nn.Linear``), Python
functions as ``call_function`` (``F.relu``, ``operator.add``) and tensor methods as ``call_method``;
``torch.export`` writes ATen overloads (``aten.linear.default``) with parameters as ``get_attr``.
Passes and the cost model ask :func:`op_kind` for a canonical kind ("linear", "conv", "add", ...)
instead of matching each spelling, so every rewrite has one code path.
"""

from __future__ import annotations

from typing import Any

# Raw names (module class names, function names, ATen schema names) -> canonical kind.
_KINDS: dict[str, str] = {}


def _kind(kind: str, *names: str) -> None:
    for name in names:
        _KINDS[name] = kind


_kind("conv", "Conv1d", "Conv2d", "Conv3d", "conv1d", "conv2d", "conv3d", "convolution", "_convolution")
_kind("linear", "Linear", "linear", "addmm")
_kind("matmul", "matmul", "bmm", "mm", "baddbmm", "einsum")
_kind("sdpa", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
_kind("batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm",
      "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
      "_native_batch_norm_legit", "native_batch_norm")
_kind("layer_norm", "LayerNorm", "layer_norm", "native_layer_norm", "RMSNorm", "rms_norm")
_kind("group_norm", "GroupNorm", "group_norm", "native_group_norm")
_kind("embedding", "Embedding", "embedding")
_kind("gru", "GRU", "gru")
_kind("lstm", "LSTM", "lstm")
_kind("rnn", "RNN", "rnn_tanh", "rnn_relu")
_kind("relu", "ReLU", "relu", "relu_")
_kind("gelu", "GELU", "gelu")
_kind("silu", "SiLU", "silu")
_kind("tanh", "Tanh", "tanh")
_kind("sigmoid", "Sigmoid", "sigmoid")
_kind("softmax", "Softmax", "softmax", "_softmax", "log_softmax", "_log_softmax")
_kind("dropout", "Dropout", "dropout", "native_dropout")
_kind("max_pool", "MaxPool1d", "MaxPool2d", "max_pool1d", "max_pool2d", "max_pool2d_with_indices")
_kind("avg_pool", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "avg_pool2d",
      "adaptive_avg_pool2d", "adaptive_avg_pool1d", "_adaptive_avg_pool2d", "avg_pool1d")
_kind("add", "add", "iadd", "add_")
_kind("sub", "sub", "isub", "rsub")
_kind("mul", "mul", "imul", "mul_")
_kind("div", "div", "truediv", "floordiv")
_kind("mean", "mean")
_kind("sum", "sum")
_kind("cat", "cat", "concat")
_kind("identity", "Identity", "clone", "alias", "detach", "contiguous")
_kind("copy_", "copy_")
_kind("view", "view", "reshape", "flatten", "Flatten", "unflatten", "transpose", "permute", "t",
      "squeeze", "unsqueeze", "expand", "getitem", "select", "slice", "split", "chunk", "unbind",
      "_unsafe_view", "split_with_sizes", "size", "sym_size", "getattr")

ACTIVATIONS = frozenset({"relu", "gelu", "silu", "tanh", "sigmoid"})
NORMS = frozenset({"batch_norm", "layer_norm", "group_norm"})
ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "relu", "gelu", "silu", "tanh", "sigmoid",
                         "dropout", "softmax", "mean", "sum"})


def raw_name(node: Any, gm: Any = None) -> str:
    """The node's own spelling: module class, function or method name, or ATen schema name."""
    op = node.op
    if op == "call_module":
        mod = gm.get_submodule(node.target) if gm is not None else None
        return type(mod).__name__ if mod is not None else str(node.target)
    if op == "call_method":
        return str(node.target)
    if op == "call_function":
        target = node.target
        schema = getattr(target, "_schema", None)
        if schema is not None:  # an ATen OpOverload
            return schema.name.split("::")[-1]
        return getattr(target, "__name__", str(target))
    return op


def op_kind(node: Any, gm: Any = None) -> str:
    """The canonical kind of a node ('conv', 'linear', 'add', ...), or its raw name if unknown."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    name = raw_name(node, gm)
    return _KINDS.get(name, name)


_RANDOM = frozenset({"bernoulli", "bernoulli_", "rand", "randn", "rand_like", "randn_like", "randint",
                     "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial", "rrelu"})


def draws_random(node: Any, gm: Any = None) -> bool:
    """Whether running the node draws random numbers (and a re-run would draw others).

    A dropout that cannot draw is not random: ``nn.Dropout(p=0.0)`` (ViTs keep one per block), or
    ``F.dropout``/``aten.dropout`` traced from a model in eval mode, where ``train=False`` is baked into
    the graph. A dropout module with p > 0 is random: the module is put in training mode to train.
    """
    if node.op == "call_module":
        mod = module_of(node, gm)
        if isinstance(mod, _dropout_modules()):
            return float(mod.p) > 0.0
        return type(mod).__name__ in ("RReLU",)
    name = raw_name(node, gm)
    if name in _RANDOM:
        return True
    if _KINDS.get(name) != "dropout":
        return False
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else ["input", "p", "training", "inplace"]
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    p = given.get("p", 0.5)
    train = given.get("train", given.get("training", True))
    if not isinstance(p, (int, float)) or not isinstance(train, bool):
        return True  # decided at run time: assume it draws
    return train and float(p) > 0.0


def _dropout_modules() -> tuple:
    import torch.nn as nn

    return (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def module_of(node: Any, gm: Any = None) -> Any | None:
    """The ``nn.Module`` a ``call_module`` node calls, else None."""
    if node.op == "call_module" and gm is not None:
        return gm.get_submodule(node.target)
    return None


def scope(node: Any) -> str:
    """The dotted module path the node belongs to (``layer1.0.conv1``), for either tracer.

    ``call_module`` nodes carry it as their target; ATen nodes from ``torch.export`` carry the
    stack of modules they were called from in ``meta['nn_module_stack']``.
    """
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        # export spells nested paths like 'layers.0.attn' or "L['self'].layers[0]"; keep dotted
        return str(path).replace("[", ".").replace("]", "").strip(".")
    return ""
