"""Where a network can grow: growable pairs of layers and residual streams that can take a new block.

A *growable pair* is layer l1 -> (element-wise activations, batch norms, dropout) -> layer l2, with
l1 and l2 both Linear or both Conv2d (module or ATen spelling). Adding k hidden units means k more
outputs of l1 (rows of its weight, entries of its bias), k more channels of every batch norm between
them, and k more inputs of l2 (columns of its weight). Nothing else in the graph sees the hidden
width, so the graph itself does not change -- only parameter shapes (``gradxform.nn.growth``).

A *block site* is the exit of a residual block, where a new block ``y = x + g(x)`` can be inserted:
when g's last layer starts at zero the function is unchanged (the DAG version of growth).

Maths and traps: ALGORITHMS.md, growth section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .analysis import find_blocks
from .match import ACTIVATIONS, op_kind, raw_name, scope

# The hidden value may pass through these on its way from l1 to l2: each acts on one unit at a time.
_PASS_THROUGH = ACTIVATIONS | {"dropout", "identity"}
# Norms that mix the hidden units: a new unit would change the others' outputs.
_MIXING_NORMS = {"layer_norm": "layer norm", "group_norm": "group norm"}


@dataclass
class Layer:
    """A Linear or Conv2d in either spelling: where its parameters live and its geometry."""

    node: fx.Node
    kind: str                       # "linear" | "conv"
    path: str                       # dotted module path, for reports
    weight: str                     # attribute path of the weight parameter in the graph module
    bias: str | None
    module: str | None = None       # the call_module target, whose size attributes are kept in step
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def weight_of(self, gm: fx.GraphModule) -> torch.nn.Parameter:
        return gm.get_parameter(self.weight)

    def bias_of(self, gm: fx.GraphModule) -> torch.nn.Parameter | None:
        return gm.get_parameter(self.bias) if self.bias is not None else None

    def kernel(self, gm: fx.GraphModule) -> tuple[int, int]:
        w = self.weight_of(gm)
        return (int(w.shape[2]), int(w.shape[3])) if self.kind == "conv" else (1, 1)


@dataclass
class Norm:
    """A batch norm between the two layers of a pair; each of its tensors grows with the hidden width."""

    node: fx.Node
    path: str
    weight: str | None
    bias: str | None
    running_mean: str | None
    running_var: str | None
    module: str | None = None


@dataclass
class GrowablePair:
    first: Layer
    second: Layer
    between: list[fx.Node]
    norms: list[Norm]
    activations: list[str]          # kinds of the element-wise activations, in order

    @property
    def name(self) -> str:
        return f"{self.first.path}->{self.second.path}"

    @property
    def kind(self) -> str:
        return self.first.kind

    def hidden(self, gm: fx.GraphModule) -> int:
        return int(self.first.weight_of(gm).shape[0])


@dataclass
class BlockSite:
    """The exit of a residual block: a new block ``y = x + g(x)`` fits after it."""

    name: str
    value: fx.Node                  # the stream value the new block reads and adds to
    kind: str                       # "conv" for an (N, C, H, W) stream, "linear" for (..., C)
    channels: int


@dataclass
class GrowthAnalysis:
    pairs: list[GrowablePair]
    rejected: dict[str, str] = field(default_factory=dict)   # layer path -> why it starts no pair
    sites: list[BlockSite] = field(default_factory=list)


def _pair2(v: Any, default: int) -> tuple[int, int]:
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def _attr_path(arg: Any, gm: fx.GraphModule) -> tuple[str | None, str]:
    """The parameter path a layer argument reads, or (None, why not)."""
    if arg is None:
        return None, ""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            gm.get_parameter(str(arg.target))
        except AttributeError:
            return None, f"'{arg.target}' is a buffer, not a parameter"
        return str(arg.target), ""
    return None, "its weight is computed in the graph, not a parameter"


def as_layer(node: fx.Node, gm: fx.GraphModule) -> tuple[Layer | None, str]:
    """The node as a growable Linear/Conv2d, or (None, why not)."""
    kind = op_kind(node, gm)
    path = scope(node) or node.name
    if kind not in ("linear", "conv"):
        return None, f"{kind} is not a Linear or Conv2d"
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        t = str(node.target)
        if isinstance(mod, torch.nn.Linear):
            return Layer(node, "linear", path, f"{t}.weight", f"{t}.bias" if mod.bias is not None else None, t), ""
        if isinstance(mod, torch.nn.Conv2d):
            if mod.groups != 1:
                return None, f"grouped or depth-wise convolution (groups={mod.groups}) is not grown"
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                return None, "only numeric zero padding is handled"
            return Layer(node, "conv", path, f"{t}.weight", f"{t}.bias" if mod.bias is not None else None, t,
                         _pair2(mod.stride, 1), _pair2(mod.padding, 0), _pair2(mod.dilation, 1)), ""
        return None, f"{type(mod).__name__} is not handled (Linear and Conv2d are)"
    if node.op != "call_function":
        return None, f"{raw_name(node, gm)} (a {node.op}) is not handled"
    name = raw_name(node, gm)
    args = list(node.args) + [None] * 9
    kw = node.kwargs
    weight, why = _attr_path(args[1] if len(node.args) > 1 else kw.get("weight"), gm)
    if weight is None:
        return None, why or "no weight"
    bias_arg = args[2] if len(node.args) > 2 else kw.get("bias")
    bias, why = _attr_path(bias_arg, gm)
    if bias_arg is not None and bias is None:
        return None, why
    if name == "linear":
        return Layer(node, "linear", path, weight, bias), ""
    if gm.get_parameter(weight).dim() != 4:
        return None, f"a {gm.get_parameter(weight).dim() - 2}-d convolution is not handled (Conv2d is)"
    if name == "conv2d":       # aten.conv2d / F.conv2d: input, weight, bias, stride, padding, dilation, groups
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
        stride = kw.get("stride", stride)
        padding, dilation, groups = kw.get("padding", padding), kw.get("dilation", dilation), kw.get("groups", groups)
    elif name == "convolution":  # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        if args[6]:
            return None, "transposed convolution is not handled"
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        return None, f"the {name} spelling is not handled (linear, conv2d and convolution are)"
    if isinstance(padding, str):
        return None, f"padding='{padding}' is not handled (numeric padding is)"
    groups = 1 if groups is None else int(groups)
    if groups != 1:
        return None, f"grouped or depth-wise convolution (groups={groups}) is not grown"
    return Layer(node, "conv", path, weight, bias, None, _pair2(stride, 1), _pair2(padding, 0),
                 _pair2(dilation, 1), groups), ""


def _as_norm(node: fx.Node, gm: fx.GraphModule) -> Norm | None:
    path = scope(node) or node.name
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            return None
        t = str(node.target)

        def has(name: str) -> str | None:
            return f"{t}.{name}" if getattr(mod, name, None) is not None else None

        return Norm(node, path, has("weight"), has("bias"), has("running_mean"), has("running_var"), t)
    if node.op == "call_function" and raw_name(node, gm) == "batch_norm":
        # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        args = list(node.args) + [None] * 5
        paths = [str(a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in args[1:5]]
        if any(a is not None and p is None for a, p in zip(args[1:5], paths)):
            return None
        return Norm(node, path, *paths)
    return None


def _data_users(value: fx.Node) -> list[fx.Node]:
    return list(value.users)


def _follow(layer: Layer, gm: fx.GraphModule) -> tuple[GrowablePair | None, str]:
    """Walk from l1's output through per-unit ops to l2, or say where the walk stops."""
    between: list[fx.Node] = []
    norms: list[Norm] = []
    acts: list[str] = []
    value = layer.node
    while True:
        users = _data_users(value)
        if not users:
            return None, "its output is not read"
        if len(users) > 1:
            names = ", ".join(scope(u) or u.name for u in users)
            return None, f"its hidden value is read by {len(users)} nodes ({names}), not one layer"
        user = users[0]
        kind = op_kind(user, gm)
        if user.op == "output":
            return None, "its output is a model output"
        if kind in ("linear", "conv"):
            if not user.args or user.args[0] is not value:
                return None, f"its hidden value feeds {scope(user) or user.name} as a weight, not an input"
            second, why = as_layer(user, gm)
            if second is None:
                return None, f"the next layer {scope(user) or user.name}: {why}"
            if second.kind != layer.kind:
                return None, (f"the next layer {second.path} is a {second.kind}, not a {layer.kind} "
                              "(a reshape between them is not followed)")
            return GrowablePair(layer, second, between, norms, acts), ""
        if kind == "batch_norm":
            norm = _as_norm(user, gm)
            if norm is None or user.args[0] is not value:
                return None, f"the batch norm {scope(user) or user.name} is not in a handled spelling"
            norms.append(norm)
        elif kind in _MIXING_NORMS:
            return None, f"a {_MIXING_NORMS[kind]} ({scope(user) or user.name}) mixes the hidden units"
        elif kind in _PASS_THROUGH and user.args and user.args[0] is value:
            if kind in ACTIVATIONS:
                acts.append(kind)
        else:
            return None, f"its hidden value goes through {kind} ({scope(user) or user.name})"
        between.append(user)
        value = user


def _uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes read each parameter or buffer path (a module called twice reads its tensors twice)."""
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            paths = [str(n.target)] * len(n.users)
        elif n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            paths = [f"{n.target}.{k}" for k, _ in list(mod.named_parameters()) + list(mod.named_buffers())]
        else:
            continue
        for path in paths:
            uses[path] = uses.get(path, 0) + 1
    return uses


def _shared(pair: GrowablePair, uses: dict[str, int]) -> str | None:
    paths = [pair.first.weight, pair.first.bias, pair.second.weight, pair.second.bias]
    paths += [p for n in pair.norms for p in (n.weight, n.bias, n.running_mean, n.running_var)]
    return next((p for p in paths if p is not None and uses.get(p, 0) > 1), None)


def growable_pairs(gm: fx.GraphModule) -> tuple[list[GrowablePair], dict[str, str]]:
    """The growable pairs in graph order, and for every other Linear/Conv2d why it starts none."""
    pairs: list[GrowablePair] = []
    rejected: dict[str, str] = {}
    uses = _uses(gm)
    for node in gm.graph.nodes:
        if op_kind(node, gm) not in ("linear", "conv"):
            continue
        layer, why = as_layer(node, gm)
        pair = None
        if layer is not None:
            pair, why = _follow(layer, gm)
        if pair is not None and (shared := _shared(pair, uses)) is not None:
            pair, why = None, f"'{shared}' is shared with another layer (tied weights do not grow)"
        if pair is None:
            rejected[scope(node) or node.name] = why
        else:
            pairs.append(pair)
    return pairs, rejected


def block_sites(gm: fx.GraphModule) -> list[BlockSite]:
    """Exits of residual blocks whose stream can take a new block (needs ``meta['val']``)."""
    sites = []
    for block in find_blocks(gm):
        val = block.exit.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
            continue
        kind = "conv" if val.dim() == 4 else "linear"
        channels = val.shape[1] if kind == "conv" else val.shape[-1]
        if not isinstance(channels, int):
            continue
        sites.append(BlockSite(f"after {block.id}", block.exit, kind, int(channels)))
    return sites


def analyse_growth(gm: fx.GraphModule) -> GrowthAnalysis:
    pairs, rejected = growable_pairs(gm)
    return GrowthAnalysis(pairs, rejected, block_sites(gm))


def growth_record(gm: fx.GraphModule) -> dict[str, Any]:
    """What growth recorded on a graph: ``pairs`` {name: {"full", "start"}} (from the ``grow`` pass) and
    ``blocks`` [{"name", "site"}] (inserted blocks, in order). Kept in ``gm.meta``, which survives a
    deep copy; a checkpoint of a grown model stores ``blocks`` to rebuild them on resume."""
    record = gm.meta.setdefault("gx_growth", {})
    record.setdefault("pairs", {})
    record.setdefault("blocks", [])
    return record


def explain_none(rejected: dict[str, str]) -> str:
    """One line per layer: why no pair starts there (for the no-growable-pair error)."""
    return "; ".join(f"{path}: {why}" for path, why in rejected.items()) or "the model has no Linear or Conv2d"
