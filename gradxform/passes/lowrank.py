"""``lowrank``: factor Linear and k x k convolution weights into low rank."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

from .base import Pass, PassResult, option, register


@dataclass
class LowRankOptions:
    rank: float = option(0.25, "rank: a fraction of the full rank (<= 1.0) or an absolute rank (> 1)")
    energy: float | None = option(None, "instead: keep the singular values holding this share of sum(sigma^2)")
    cutoff: float | None = option(None, "instead: keep sigma >= cutoff * sigma_max")
    mode: Literal["factor", "usv"] = option("factor", "factor: A and B trained (AB); usv: U, V frozen, S trained (OIALR)")
    keep: tuple[str, ...] = option(("first", "last"), "layers never factored: first, last (or neither: none)")
    only: tuple[str, ...] = option((), "factor only layers whose path matches one of these patterns (fnmatch)")
    skip: tuple[str, ...] = option((), "never factor layers whose path matches one of these patterns")
    force: bool = option(False, "factor even where it saves no FLOPs (full-rank equivalence checks)")

    def validate(self) -> None:
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.cutoff is not None and not 0 <= self.cutoff < 1:
            raise ValueError(f"cutoff must be in [0, 1), got {self.cutoff}")
        if not self.rank > 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        bad = [k for k in self.keep if k not in ("first", "last", "none")]
        if bad:
            raise ValueError(f"keep takes first, last or none, got {bad[0]!r}")


@register
class LowRank(Pass):
    """Factor Linear layers (in -> r -> out) and k x k convolutions (k x k to r channels, then 1x1), only
    where that reduces both parameters and FLOPs at the chosen rank: r < in*out/(in+out) for a Linear,
    r < out*in*k^2/(in*k^2 + out) for a convolution. Grouped and depth-wise convolutions, embeddings and,
    by default, the first and last layers are left alone. Works on both tracer spellings (an exported
    graph's ``aten.linear`` becomes a call to the factored layer).
    """

    name = "lowrank"
    summary = "factor Linear and conv weights into low rank (truncated SVD; AB or OIALR's USV form)"
    Options = LowRankOptions
    preserves_function = False

    def run(self, gm: Any, ctx: Any) -> PassResult:
        import torch.nn as nn

        from ..ir.cost import _numel, evaluate, hints, named, node_costs
        from ..ir.match import op_kind, scope
        from ..nn.lowrank import LowRankConv2d, LowRankLinear, Spectrum, USVLinear, choose_rank, factored

        opts = self.options
        costs, values = node_costs(gm), hints(gm)
        layers = [n for n in gm.graph.nodes if op_kind(n, gm) in ("linear", "conv", "embedding")
                  and not factored(gm.get_submodule(n.target) if n.op == "call_module" else None)]
        weighted = [n for n in layers if op_kind(n, gm) in ("linear", "conv")]
        kept = set()
        if "first" in opts.keep and weighted:
            kept.add(weighted[0])
        if "last" in opts.keep and weighted:
            kept.add(weighted[-1])
        notes, rows = _leaf_notes(gm), []
        count = 0
        for node in layers:
            kind = op_kind(node, gm)
            path = scope(node) or node.name
            dense, reason = _dense(gm, node, kind, nn)
            if reason is None and node in kept:
                reason = "first or last layer (keep=first,last)"
            if reason is None and opts.only and not any(fnmatch.fnmatch(path, p) for p in opts.only):
                reason = "not matched by only="
            if reason is None and any(fnmatch.fnmatch(path, p) for p in opts.skip):
                reason = "matched by skip="
            if reason is None and isinstance(dense.layer, nn.Conv2d) and opts.mode == "usv":
                reason = "usv mode factors Linear layers only"
            if reason is not None:
                notes.append(f"{path} not factored: {reason}")
                continue
            layer = dense.layer
            # r (in k^2 + out) < out in k^2; for a Linear k = 1. Checked before the decomposition
            # when the rank is given, so that a layer left alone costs no SVD.
            out_f, in_f = layer.weight.shape[0], layer.weight[0].numel()
            limit = out_f * in_f / (in_f + out_f)
            by_spectrum = opts.energy is not None or opts.cutoff is not None
            if not by_spectrum and not opts.force:
                r = choose_rank(_Full(min(out_f, in_f)), opts.rank)
                if r >= limit:
                    notes.append(f"{path} not factored: rank {r} saves nothing (needs < {limit:.0f})")
                    continue
            spectrum = Spectrum(layer.weight)  # the one decomposition of this layer
            s = spectrum.s
            r = choose_rank(s, None if by_spectrum else opts.rank, opts.energy, opts.cutoff)
            if r >= limit and not opts.force:
                notes.append(f"{path} not factored: rank {r} saves nothing (needs < {limit:.0f})")
                continue
            discarded = spectrum.discarded(r)
            if isinstance(layer, nn.Conv2d):
                new = LowRankConv2d.from_conv(layer, r, spectrum)
            elif opts.mode == "usv":
                new = USVLinear.from_linear(layer, r, spectrum)
            else:
                new = LowRankLinear.from_linear(layer, r, spectrum)
            before = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
            after = sum(p.numel() for p in new.parameters()) + (
                sum(b.numel() for b in new.buffers()) if opts.mode == "usv" else 0)
            out_val = node.meta.get("val")
            flops = [evaluate(costs[node].flops, values),
                     evaluate(named(new.gx_flops(_numel(out_val)), gm), values) if out_val is not None else None]
            self._install(gm, node, dense, new, count)
            count += 1
            rows.append({"layer": path, "rank": r, "full_rank": int(s.numel()), "params": [before, after],
                         "flops": flops, "frobenius_error": discarded,
                         "spectral_error": float(s[r]) if r < s.numel() else 0.0})
            notes.append(f"{path}: rank {r} of {s.numel()} ({opts.mode}), parameters {before} -> {after}, "
                         f"FLOPs {flops[0]:.3g} -> {flops[1]:.3g}, weight error {discarded:.3g} "
                         "(Frobenius, Eckart-Young)")
        if not rows:
            notes.append("no layer factored")
        return PassResult(gm, bool(rows), notes, {"layers": rows})

    @staticmethod
    def _install(gm: Any, node: Any, dense: "_Dense", new: Any, count: int) -> None:
        from ..ir.subgraph import replace_module

        if node.op == "call_module":
            replace_module(gm, str(node.target), new)
            return
        name = f"lowrank{count}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, new)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (dense.x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in dense.reads:  # a transpose of the weight, then the weight and bias themselves
            if not attr.users:
                gm.graph.erase_node(attr)
                # the dense weight is no longer read: drop it, or it would stay a trained parameter
                if attr.op == "get_attr" and not any(n.op == "get_attr" and n.target == attr.target
                                                     for n in gm.graph.nodes):
                    owner, _, leaf = str(attr.target).rpartition(".")
                    delattr(gm.get_submodule(owner) if owner else gm, leaf)


class _Full:
    """Stands in for a spectrum where only its length is read (a rank given as a fraction)."""

    def __init__(self, n: int):
        self.n = n

    def numel(self) -> int:
        return self.n


class _Dense:
    """A layer to factor: the module (or one standing for an exported op), its input, what it reads."""

    def __init__(self, layer: Any, x: Any = None, reads: tuple = ()):
        self.layer, self.x, self.reads = layer, x, reads


def _dense(gm: Any, node: Any, kind: str, nn: Any) -> tuple[_Dense | None, str | None]:
    """The layer to factor, or the reason it is left alone.

    Exported graphs spell a Linear as ``aten.linear(x, W, b)`` and HuggingFace's GPT-2 ``Conv1D`` (a
    Linear whose weight is stored transposed, in x out) as ``aten.addmm(b, x, W)``.
    """
    import torch

    if kind == "embedding":
        return None, "embedding"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1:
                return None, "grouped or depth-wise convolution"
            return _Dense(mod), None
        if isinstance(mod, nn.Linear):
            return _Dense(mod), None
        return None, f"{type(mod).__name__} is not handled"
    aten = torch.ops.aten
    if node.target is aten.linear.default and _is_param(gm, node.args[1]):
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None and not _is_param(gm, bias):
            return None, "its bias is computed, not a parameter"
        weight = gm.get_parameter(node.args[1].target)
        return _Dense(_linear(weight, bias and gm.get_parameter(bias.target), nn), node.args[0],
                      (node.args[1], *([bias] if bias is not None else []))), None
    if node.target is aten.addmm.default and not node.kwargs and len(node.args) == 3:
        bias, x, w = node.args
        reads: tuple = (w,)
        transposed = isinstance(w, torch.fx.Node) and w.target in (aten.t.default, aten.permute.default) \
            and len(w.all_input_nodes) == 1
        source = w.args[0] if transposed else w
        if _is_param(gm, source) and _is_param(gm, bias):
            stored = gm.get_parameter(source.target)
            if transposed:  # addmm(b, x, W.t()): a decomposed nn.Linear, W is out x in
                reads, weight = (w, source, bias), stored
            else:           # addmm(b, x, W): Conv1D, W is in x out
                reads, weight = (w, bias), stored.t()
            return _Dense(_linear(weight, gm.get_parameter(bias.target), nn), x, reads), None
    return None, "only nn.Linear/nn.Conv2d modules, exported aten.linear and addmm with parameter weights are handled"


def _is_param(gm: Any, node: Any) -> bool:
    import torch

    if getattr(node, "op", None) != "get_attr":
        return False
    try:
        return isinstance(gm.get_parameter(node.target), torch.nn.Parameter)
    except AttributeError:
        return False


def _linear(weight: Any, bias: Any, nn: Any) -> Any:
    """An nn.Linear holding ``weight`` (out x in) and ``bias``, without initialising any memory."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def _leaf_notes(gm: Any) -> list[str]:
    """Notes for layers kept whole by the tracer whose weights this pass cannot reach."""
    import torch.nn as nn

    notes = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention):
            notes.append(f"{n.target} not factored: nn.MultiheadAttention runs its projections inside one layer "
                         f"(in_proj_weight, out_proj); trace with --tracer export to expose them as linear ops")
    return notes
