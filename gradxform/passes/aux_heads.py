"""``aux-heads``: a small classifier head on every stage boundary, the local loss of DGL and forward gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import PipelineError
from .base import Pass, PassResult, option, register

# forward-mode gaps in torch 2.13 and what the runtime does about them (docs/methods.md §5)
_FORWARD_MODE_NOTES = {
    "batch_norm": "BatchNorm in training mode runs on batch statistics without updating its running statistics "
                  "while tangents are pushed (torch.func.jvp rejects the in-place update)",
    "sdpa": "scaled-dot-product attention uses the math kernel while tangents are pushed (the fused kernels have "
            "no forward-mode rule)",
    "lstm": "LSTM runs with mkldnn disabled while tangents are pushed (its mkldnn kernel has no forward-mode rule)",
    "multihead": "nn.MultiheadAttention's fast path is disabled while tangents are pushed",
}


@dataclass
class AuxHeadsOptions:
    head: Literal["linear", "mlp-sr", "cnn"] = option("cnn", "head architecture: linear (BN, pool, Linear), mlp-sr (DGL), cnn (Fournier et al.)")
    width: int = option(0, "channels/width inside the head (0: the widest of 32, 16, 8 keeping all heads under "
                           "10% of the model's FLOPs)")
    at: Literal["stages", "blocks"] = option("stages", "stages: a head on every stage boundary of a split model; "
                                                       "blocks: split after every residual block, a head on each")
    schedule: str = option("local", "the schedule 'gradxform train' uses by default: local or "
                                    "forward-grad{guess=..,tangents=..,combine=..}")

    def validate(self) -> None:
        if self.width < 0:
            raise ValueError(f"width must be 0 (automatic) or positive, got {self.width}")
        if not (self.schedule == "local" or self.schedule.startswith("forward-grad")):
            raise ValueError(f"schedule must be local or forward-grad{{...}}, got {self.schedule!r}")


@register
class AuxHeads(Pass):
    """Attach an auxiliary classifier head to the output of every stage but the last.

    A head is built from the stage output's shape (convolutional (N, C, H, W), sequence (N, T, D) or flat
    (N, D)) and predicts the model's own target: classes, or tokens when the model predicts per token.
    The heads are extra submodules of their stages (``stage.aux_head``): the model's forward and output
    are unchanged, and the ``local`` and ``forward-grad`` schedules train each stage on its head.
    """

    name = "aux-heads"
    summary = "auxiliary classifier heads on stage boundaries (local losses for DGL and forward gradients)"
    Options = AuxHeadsOptions
    whole_model = True

    def compiles_for(self) -> str | None:
        return self.options.schedule

    def run(self, gm: Any, ctx: Any) -> PassResult:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from ..ir.match import op_kind
        from ..nn.heads import AuxHead, build_head, head_flops
        from ..nn.staged import StagedModule
        from ..state import frozen_buffers

        opts = self.options
        notes: list[str] = []
        staged = isinstance(gm, StagedModule)
        if opts.at == "blocks":
            if staged:
                raise PipelineError("aux-heads{at=blocks} splits the model itself; it cannot follow 'split'",
                                    hint="drop the 'split' before it, or use aux-heads{at=stages}")
            gm = _split_after_blocks(gm)
            notes.append(f"split after every residual block: {len(gm.stages)} stages")
        elif not staged:
            raise PipelineError("aux-heads{at=stages} needs a model split into stages",
                                hint="put 'split{stages=K}' before it (the 'dgl' and 'fwd-local' composites do), "
                                     "or use aux-heads{at=blocks}")
        stages = list(gm.stages)
        if len(stages) < 2:
            notes.append("one stage: no boundary to put a head on")
            return PassResult(gm, False, notes, {"heads": []})
        final = _first_tensor(stages[-1])
        if final is None:
            raise PipelineError("aux-heads: cannot find the model's prediction tensor in the last stage's output")
        per_token = final.dim() >= 3
        classes = _concrete(final.shape[-1])
        batch = _batch_of(tuple(ctx.args) + tuple(ctx.kwargs.values()))
        with frozen_buffers(gm), torch.no_grad(), FlopCounterMode(display=False) as counter:
            gm(*ctx.args, **ctx.kwargs)
        model_flops = int(counter.get_total_flops())
        targets = []
        for j, stage in enumerate(stages[:-1]):
            if hasattr(stage, "aux_head"):
                notes.append(f"stage {j} already has a head; left as it is")
                continue
            index, val = _head_input(stage)
            if val is None:
                notes.append(f"stage {j}: no floating-point (N, ...) output to put a head on")
                continue
            targets.append((j, stage, index, tuple(_concrete(s) for s in val.shape[1:])))

        def build_all(width: int) -> list:
            # every head input has 1 to 3 per-sample dimensions (_head_input), which build_head covers
            bodies = [build_head(opts.head, shape, classes, width, per_token) for _, _, _, shape in targets]
            return [(body, head_flops(body, shape, batch)) for body, (_, _, _, shape) in zip(bodies, targets)]

        # width 0: the widest of 32, 16, 8 whose heads stay under 10% of the model's FLOPs (the
        # reference papers' budget; Fournier et al. use 32 for 8 modules, 16 for 16)
        candidates = [opts.width] if opts.width or opts.head == "linear" else [32, 16, 8]
        for width in candidates:
            built = build_all(width)
            if sum(f for _, f in built) <= 0.10 * model_flops:
                break
        if len(candidates) > 1:
            notes.append(f"head width {width} (automatic: the widest of 32, 16, 8 under 10% of the model's FLOPs, "
                         f"else 8)")
        info, total = [], 0
        for (j, stage, index, shape), (body, flops) in zip(targets, built):
            param = next(stage.parameters(), None)
            if param is not None:
                body = body.to(dtype=param.dtype, device=param.device)
            head = AuxHead(body, opts.head, index, shape, classes, per_token)
            stage.add_module("aux_head", head)
            total += flops
            params = sum(p.numel() for p in head.parameters())
            info.append({"stage": j, "input": f"output {index}, (N, {', '.join(map(str, shape))})",
                         "flops": flops, "params": params, "share": flops / max(1, model_flops)})
            notes.append(f"stage {j}: {opts.head} head on output {index} (N, {', '.join(map(str, shape))}) -> "
                         f"{classes} {'tokens' if per_token else 'classes'}; {params / 1e3:.1f}k parameters, "
                         f"{flops / 1e6:.2f} MFLOPs at batch {batch} ({flops / max(1, model_flops):.1%} of the model)")
        share = total / max(1, model_flops)
        notes.append(f"heads together: {total / 1e6:.2f} MFLOPs, {share:.1%} of the model's {model_flops / 1e6:.2f} "
                     f"MFLOPs" + (" (above the 10% the reference papers keep to: try head=linear or a smaller "
                                  "width)" if share > 0.10 else ""))
        later = set()
        for stage in stages[1:]:
            for n in stage.graph.nodes:
                kind = op_kind(n, stage)
                if kind in ("batch_norm", "sdpa", "lstm"):
                    later.add(kind)
                if n.op == "call_module" and isinstance(stage.get_submodule(n.target), torch.nn.MultiheadAttention):
                    later.add("multihead")
        for kind in sorted(later):
            notes.append("forward-grad: " + _FORWARD_MODE_NOTES[kind])
        return PassResult(gm, bool(info), notes, {"heads": info, "share": share, "model_flops": model_flops,
                                                  "schedule": opts.schedule})


def _concrete(size: Any) -> int:
    from ..ir.meta import concrete

    return concrete(size)


def _batch_of(args: tuple) -> int:
    import torch

    for a in args:
        if isinstance(a, torch.Tensor) and a.dim():
            return int(a.shape[0])
    return 1


def _outputs(stage: Any) -> list:
    out = next(n for n in stage.graph.nodes if n.op == "output").args[0]
    import torch.fx as fx

    flat: list = []
    fx.node.map_arg(out, lambda n: flat.append(n))
    return flat


def _first_tensor(stage: Any) -> Any:
    import torch

    for n in _outputs(stage):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            return val
    return None


def _head_input(stage: Any) -> tuple[int, Any]:
    """The boundary's main activation: of the floating-point (N, ...) tensors it carries, the one with
    the most values per sample (an LM's hidden states rather than its attention mask)."""
    import torch

    out = next(n for n in stage.graph.nodes if n.op == "output").args[0]
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    best, size = (-1, None), -1
    for i, n in enumerate(items):
        val = getattr(n, "meta", {}).get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point() and 2 <= val.dim() <= 4:
            per_sample = 1
            for s in val.shape[1:]:
                per_sample *= _concrete(s)
            if per_sample > size:
                best, size = (i, val), per_sample
    return best


def _split_after_blocks(gm: Any) -> Any:
    from ..ir.analysis import analyse
    from .split import build_stages

    an = analyse(gm)
    pos = {n: i for i, n in enumerate(an.order)}
    valid = {c.index for c in an.valid_cuts}
    cuts = sorted({pos[b.exit] + 1 for b in an.blocks if pos[b.exit] + 1 in valid and pos[b.exit] + 1 < len(an.order)})
    if not cuts:
        raise PipelineError("aux-heads{at=blocks}: the model has no residual block to cut after",
                            hint="split it with 'split{stages=K}' and use aux-heads{at=stages}")
    return build_stages(gm, an, cuts)
