"""``grow``: shrink every growable pair to a starting width, so that training can grow it back."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .base import Pass, PassResult, option, register


@dataclass
class GrowOptions:
    width: tuple[float, ...] = option((0.125,), "starting hidden width: a fraction of the current width (<= 1.0) "
                                      "or a count (> 1); one value for every pair, or one per pair in graph order")
    targets: tuple[str, ...] = option((), "shrink only pairs whose name (first->second) or first layer matches "
                                      "one of these patterns (fnmatch); none: every pair")
    init: Literal["reset", "slice"] = option("reset", "reset: fresh initialisation at the new fan-in (a small "
                                             "model from scratch); slice: keep the first units' weights")
    seed: int = option(0, "seed of the fresh initialisation (init=reset); the global RNG is left alone")

    def validate(self) -> None:
        if not self.width:
            raise ValueError("width needs at least one value")
        bad = [w for w in self.width if not w > 0 or (w > 1 and w != int(w))]
        if bad:
            raise ValueError(f"width takes fractions in (0, 1] or whole counts > 1, got {bad[0]}")


@register
class Grow(Pass):
    """Shrink the hidden width of every growable pair (l1 -> activation/BatchNorm -> l2, both Linear or
    both Conv2d): l1 keeps its first units' outputs, l2 the matching inputs, batch norms between them
    their channels. The model's inputs and outputs (the first and last layers' interfaces) are
    unchanged. The report lists each pair with its width before and after; the widths before are
    recorded on the module (``gradxform.ir.growth.growth_record``) as the default cap for growing back.
    """

    name = "grow"
    summary = "shrink growable layer pairs to a starting width, for growing during training (TINY)"
    Options = GrowOptions
    preserves_function = False
    # Growth is driven by a training callback; any schedule that trains one graph may run it.
    schedule: ClassVar[str | None] = None

    def run(self, gm: Any, ctx: Any) -> PassResult:
        import torch

        from ..errors import GradxformError
        from ..ir.growth import explain_none, growable_pairs, growth_record
        from ..nn.growth import set_width

        opts = self.options
        pairs, rejected = growable_pairs(gm)
        if not pairs:
            raise GradxformError(f"no growable pair: {explain_none(rejected)}", where="grow",
                                 hint="grow adds units between Linear -> activation -> Linear or Conv2d -> "
                                      "(BatchNorm) -> activation -> Conv2d layers")
        if len(opts.width) not in (1, len(pairs)):
            raise GradxformError(f"width has {len(opts.width)} values for {len(pairs)} growable pairs",
                                 where="grow", hint="give one width for every pair, or one per pair: "
                                 + ", ".join(p.name for p in pairs))
        widths = opts.width * len(pairs) if len(opts.width) == 1 else opts.width
        rows, notes = [], []
        recorded = growth_record(gm)["pairs"]
        plan = []
        for pair, w in zip(pairs, widths):
            if opts.targets and not any(fnmatch.fnmatch(pair.name, t) or fnmatch.fnmatch(pair.first.path, t)
                                        for t in opts.targets):
                notes.append(f"{pair.name}: not shrunk (not matched by targets=)")
                continue
            full = pair.hidden(gm)
            start = max(1, round(w * full)) if w <= 1 else int(w)
            if start > full:
                raise GradxformError(f"width {start} is wider than the pair's {full} units", where=f"grow: {pair.name}",
                                     hint="grow only shrinks; give a count <= the current width or a fraction")
            plan.append((pair, full, start))
        for pair, full, start in plan:
            set_width(gm, pair, start)
            rows.append({"pair": pair.name, "kind": pair.kind, "activations": pair.activations,
                         "norms": [n.path for n in pair.norms], "hidden": [full, start]})
            recorded[pair.name] = {"full": recorded.get(pair.name, {}).get("full", full), "start": start}
            between = "".join(f" -> {k}" for k in [n.path for n in pair.norms] + pair.activations)
            notes.append(f"{pair.name}: hidden width {full} -> {start} ({pair.kind}{between})")
        for path, why in rejected.items():
            notes.append(f"{path}: starts no growable pair ({why})")
        shrunk = [pair for pair, full, start in plan if start != full]
        if opts.init == "reset" and shrunk:
            # seeded and forked: the pass gives the same weights every time and leaves the global RNG alone
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(opts.seed)
                _reset(gm, shrunk, torch)
        changed = bool(shrunk)
        if changed:
            for node in gm.graph.nodes:  # shapes changed: the manager re-propagates
                if node.op != "placeholder":
                    node.meta.pop("val", None)
        return PassResult(gm, changed, notes, {"pairs": rows})


def _reset(gm: Any, pairs: list, torch: Any) -> None:
    """Fresh initialisation of every layer and norm the shrunk pairs touch, each once, in graph order."""
    layers = {}
    for pair in pairs:
        layers.setdefault(pair.first.weight, pair.first)
        layers.setdefault(pair.second.weight, pair.second)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for layer in sorted(layers.values(), key=lambda l: order[l.node]):
        _reset_layer(gm, layer, torch)
    for pair in pairs:
        for norm in pair.norms:
            for path, value in ((norm.weight, 1.0), (norm.bias, 0.0), (norm.running_mean, 0.0), (norm.running_var, 1.0)):
                if path is not None:
                    owner, _, leaf = path.rpartition(".")
                    getattr(gm.get_submodule(owner) if owner else gm, leaf).fill_(value)


def _reset_layer(gm: Any, layer: Any, torch: Any) -> None:
    """PyTorch's default initialisation for the layer's current shape (its fan-in changed)."""
    w, b = layer.weight_of(gm), layer.bias_of(gm)
    if layer.kind == "conv":
        fresh = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=b is not None)
    else:
        fresh = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    w.copy_(fresh.weight.to(w.dtype))
    if b is not None:
        b.copy_(fresh.bias.to(b.dtype))
