"""``ab``: AB-training (Coquelin et al., arXiv 2405.01067; ALGORITHMS.md §6), data parallel on one stage.

The model is compiled with ``lowrank{mode=factor}``: every factored layer computes ``W = B A``. The
world's ranks (the replicas, ``--replicas``) are split into groups of ``group_size`` (leftover ranks join
the first groups); the first half of the groups train A with B frozen, the second half B with A frozen,
and the gradients of the trained factor and of the 1-D parameters (norms, biases) are all-reduced inside
the group only. The weights of the layers ``lowrank`` kept full rank (the first layer, the head) are
all-reduced across all ranks every step. Optimizer steps, counted from the first:

- ``warmup`` steps: full-rank data parallelism over all ranks, then the first factorisation (no cut);
- a cycle of ``sync_every`` A/B steps, then a sync across all ranks (``sync=full``: the mean of each
  rank's ``W = B A``; ``with-stale``: mean B times mean A, stale copies included; ``only-learned``: the
  mean of A over the A-groups times the mean of B over the B-groups), then ``full_steps`` full-rank
  steps over all ranks, then a re-factorisation by SVD keeping ``sigma >= cutoff * sigma_max`` (never
  above the rank of the round before; the rank is the MAX over ranks so shapes agree);
- after every switch of shapes the optimizer state is reset and the learning rate rebounds: 1e-5,
  ramping linearly back to the epoch's rate over ``rebound`` steps (from step 0 too: a fresh optimizer).

A full-rank phase trains the layer's own weight: ``A = W`` (out x in k k), ``B = I`` frozen, so the
factored module computes exactly the dense layer and needs no other code path. Every collective goes
through the trainer's tally, so ``allreduce_bytes`` in metrics.jsonl counts the syncs and the full-rank
phases too. Evaluation is of each rank's own model (the groups differ between syncs); the reported
accuracy is the mean over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...errors import GradxformError
from ...nn.lowrank import LowRankConv2d, LowRankLinear, dense_shape, factor_weights, product, refactor, set_dense
from ...options import option
from ..data_parallel import gradients
from .backprop import Backprop
from .base import register

FLOOR_LR = 1e-5


@dataclass
class ABOptions:
    group_size: int = option(4, "ranks per group; the first half of the groups train A, the second half B")
    sync_every: int = option(20, "A/B optimizer steps between two syncs across all ranks")
    full_steps: int = option(5, "full-rank steps over all ranks after each sync, before re-factorising")
    cutoff: float = option(0.1, "re-factorisation keeps sigma >= cutoff * sigma_max")
    sync: Literal["full", "with-stale", "only-learned"] = option(
        "with-stale", "sync: full (mean of W = BA) | with-stale (mean B x mean A) | only-learned (each factor "
                      "averaged over the groups that trained it)")
    rebound: int = option(10, "steps over which the LR ramps back from 1e-5 after every switch (0: none)")
    warmup: int = option(0, "full-rank steps over all ranks before the first factorisation (0: start factored)")
    accumulate: int = option(1, "backwards per optimizer step")

    def validate(self) -> None:
        if self.group_size < 1 or self.sync_every < 1 or self.accumulate < 1:
            raise ValueError("group_size, sync_every and accumulate must be at least 1")
        if self.full_steps < 0 or self.rebound < 0 or self.warmup < 0:
            raise ValueError("full_steps, rebound and warmup must be 0 or more")
        if not 0 <= self.cutoff < 1:
            raise ValueError(f"cutoff must be in [0, 1), got {self.cutoff}")


# -- the tick logic, pure: which phase a step is in, what happens between two steps, who trains what ----

def phase_at(step: int, o: ABOptions) -> str:
    """The phase of optimizer step ``step`` (0-based): ``warmup``, ``ab`` or ``full``."""
    if step < o.warmup:
        return "warmup"
    q = (step - o.warmup) % (o.sync_every + o.full_steps)
    return "ab" if q < o.sync_every else "full"


def switch_after(step: int, o: ABOptions) -> tuple[str, ...]:
    """What happens between optimizer steps ``step`` and ``step + 1``: ``("factor",)`` at the end of the
    warm-up, ``("sync", "dense")`` into a full-rank phase, ``("refactor",)`` out of one,
    ``("sync", "refactor")`` when there is no full-rank phase; ``()`` otherwise."""
    now, nxt = phase_at(step, o), phase_at(step + 1, o)
    if now == "warmup":
        return ("factor",) if nxt == "ab" else ()
    starts_cycle = (step + 1 - o.warmup) % (o.sync_every + o.full_steps) == 0
    if now == "ab" and nxt == "full":
        return ("sync", "dense")
    if now == "full" and nxt == "ab":
        return ("refactor",)
    if now == "ab" and starts_cycle:  # full_steps = 0
        return ("sync", "refactor")
    return ()


def groups_of(world: int, size: int) -> list[list[int]]:
    """Ranks in groups of ``size``; leftover ranks join the first groups, one each."""
    count = world // size
    groups = [list(range(k * size, (k + 1) * size)) for k in range(count)]
    for i, rank in enumerate(range(count * size, world)):
        groups[i % count].append(rank)
    return groups


def trains(group: int, groups: int) -> str:
    """Which factor group ``group`` of ``groups`` trains: the first half A, the second half B."""
    return "A" if group < groups // 2 else "B"


def check_groups(world: int, size: int) -> None:
    """The group layout leaves every group with partners, and at least one A- and one B-group."""
    if size < 2:
        raise GradxformError(f"ab{{group_size={size}}}: a group of {size} rank has no partner to all-reduce with",
                             hint="use group_size=2 or more")
    if world < 2 * size:
        raise GradxformError(f"ab{{group_size={size}}} on {world} ranks makes {world // size} group(s); AB-training "
                             "needs at least two, one training A and one training B",
                             hint=f"use group_size={max(2, world // 2)} or less, or --replicas {2 * size} or more")


def _factored(module: torch.nn.Module) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]


@register
class ABTraining(Backprop):
    name = "ab"
    summary = "AB-training: data-parallel groups train the A or B factors, synced every few steps (lowrank{mode=factor})"
    Options = ABOptions
    family = "data-parallel"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.step = 0                  # optimizer steps taken
        self.since_switch = 0          # steps since the last change of shapes (the LR rebound)
        self.ranks: dict[str, int] = {}  # each layer's rank in the A/B phases (a cap for the next round)

    # -- requirements ------------------------------------------------------------------------------
    def check(self, staged: Any) -> None:
        if not any(_factored(stage) for stage in staged.stages):
            raise GradxformError("the ab schedule trains the A and B factors of low-rank layers, and this model has none",
                                 hint="compile with lowrank{mode=factor} first (e.g. --pass 'lowrank{mode=factor,rank=0.5}')")

    def check_data_parallel(self, replicas: int, stages: int) -> None:
        if stages > 1:
            raise GradxformError(f"the ab schedule is data parallel on one stage; the model has {stages}",
                                 hint="compile without split (one stage) and set the ranks with --replicas")
        if replicas < 2:
            raise GradxformError("the ab schedule needs data-parallel ranks (--replicas), and this run has one",
                                 hint=f"use --replicas {2 * self.options.group_size} (two groups of "
                                      f"group_size={self.options.group_size})")
        check_groups(replicas, self.options.group_size)

    # -- set-up --------------------------------------------------------------------------------------
    def replicate(self, trainer: Any) -> None:
        import torch.distributed as dist

        o = self.options
        self.trainer = trainer
        self.comm = trainer.data_parallel.comm
        self.world, self.rank = trainer.replicas, trainer.replica
        self.groups = groups_of(self.world, o.group_size)
        # a collective: every rank makes every group
        self.group, _ = dist.new_subgroups_by_enumeration(self.groups)
        mine = next(k for k, g in enumerate(self.groups) if self.rank in g)
        self.group_size = len(self.groups[mine])
        self.role = trains(mine, len(self.groups))
        self.count = {f: sum(len(g) for k, g in enumerate(self.groups) if trains(k, len(self.groups)) == f)
                      for f in "AB"}
        (self.ex,) = trainer.executors.values()
        self.ranks = self.ranks or {n: m.rank for n, m in _factored(self.ex.module)}
        self.ex.before_update.append(self.before_update)
        self.ex.after_update.append(self.after_update)
        if o.warmup and self.step == 0:  # the warm-up trains the layers at full rank
            for _, layer in _factored(self.ex.module):
                set_dense(layer, product(layer))
            trainer.new_optimizer(self.ex)

    def _params(self) -> dict[str, list[torch.Tensor]]:
        """This step's parameters by where their gradients go: ``group`` (the trained factor and 1-D
        parameters in the A/B phase), ``world`` (everything else that trains), ``frozen``."""
        phase = phase_at(self.step, self.options)
        factors: dict[int, str] = {}
        for _, layer in _factored(self.ex.module):
            a, b = factor_weights(layer)
            factors[id(a)], factors[id(b)] = "A", "B"
        out: dict[str, list[torch.Tensor]] = {"group": [], "world": [], "frozen": []}
        for p in self.ex.params:
            kind = factors.get(id(p))
            if phase != "ab":  # full rank: A is W, B is the identity
                out["frozen" if kind == "B" else "world"].append(p)
            elif kind is not None:
                out["group" if kind == self.role else "frozen"].append(p)
            else:
                out["group" if p.dim() <= 1 else "world"].append(p)
        return out

    # -- every step ------------------------------------------------------------------------------------
    def before_update(self) -> None:
        params = self._params()
        for p in params["frozen"]:
            p.grad = None  # the optimizer skips it: no momentum, no weight decay on a frozen factor
        if phase_at(self.step, self.options) == "ab":
            self.comm.average(gradients(params["group"]), self.group, self.group_size)
        self.comm.average(gradients(params["world"]), None, self.world)
        base = self.trainer.lr_at(self.trainer.epoch)
        ramp = 1.0 if not self.options.rebound else min(1.0, self.since_switch / self.options.rebound)
        lr = base if ramp >= 1.0 else FLOOR_LR + (base - FLOOR_LR) * ramp
        for group in self.ex.optimizer.param_groups:
            group["lr"] = lr

    def after_update(self) -> bool:
        actions = switch_after(self.step, self.options)
        self.step += 1
        self.since_switch += 1
        if not actions:
            return False
        layers = _factored(self.ex.module)
        weights = self._sync(layers) if "sync" in actions else {n: product(m) for n, m in layers}
        if "dense" in actions:
            for name, layer in layers:
                set_dense(layer, weights[name])
        else:
            cutoff = 0.0 if "factor" in actions else self.options.cutoff
            self._refactor(layers, weights, cutoff, cap="factor" not in actions)
        self.trainer.new_optimizer(self.ex)
        self.since_switch = 0
        return True

    @torch.no_grad()
    def _sync(self, layers: list[tuple[str, Any]]) -> dict[str, torch.Tensor]:
        """Every rank's weights made one: each factored layer's W by the sync mode, every other
        parameter and floating-point buffer averaged over all ranks."""
        mode, out = self.options.sync, {}
        for name, layer in layers:
            a, b = (f.detach().reshape(f.shape[0], -1).clone() for f in factor_weights(layer))
            if mode == "full":
                w = product(layer)
                self.comm.all_reduce(w)
                out[name] = w / self.world
                continue
            if mode == "with-stale":
                self.comm.all_reduce(a)
                self.comm.all_reduce(b)
                a, b = a / self.world, b / self.world
            else:  # only-learned: a rank contributes the factor it trained, the mean is over its trainers
                a = a if self.role == "A" else torch.zeros_like(a)
                b = b if self.role == "B" else torch.zeros_like(b)
                self.comm.all_reduce(a)
                self.comm.all_reduce(b)
                a, b = a / self.count["A"], b / self.count["B"]
            out[name] = b @ a
        factored = {id(t) for _, m in layers for t in factor_weights(m)}
        others = [p.data for p in self.ex.module.parameters() if id(p) not in factored]
        others += [t for t in self.ex.module.buffers() if t.is_floating_point()]
        self.comm.average(others, None, self.world)
        return out

    def _refactor(self, layers: list[tuple[str, Any]], weights: dict[str, torch.Tensor], cutoff: float,
                  cap: bool) -> None:
        from ...nn.lowrank import Spectrum, choose_rank

        spectra = {name: Spectrum(weights[name]) for name, _ in layers}
        wanted = []
        for name, layer in layers:
            full = min(dense_shape(layer))
            r = full if cutoff == 0 else choose_rank(spectra[name].s, cutoff=cutoff)
            wanted.append(min(r, self.ranks.get(name, full)) if cap else min(r, full))
        # every rank must build the same shapes: the largest rank any of them wants
        agreed = torch.tensor(wanted, dtype=torch.int64)
        self.comm.all_reduce(agreed, op=_max())
        for (name, layer), r in zip(layers, agreed.tolist()):
            refactor(layer, weights[name], int(r))
            self.ranks[name] = int(r)

    # -- records and checkpoints ----------------------------------------------------------------------
    def metrics(self, trainer: Any) -> dict[str, Any]:
        (ex,) = trainer.executors.values()
        layers = _factored(ex.module)
        dense = sum(p.numel() for p in ex.module.parameters())
        factored_now = 0
        for name, layer in layers:
            a, b = factor_weights(layer)
            out, inner = dense_shape(layer)
            r = self.ranks.get(name, layer.rank)
            dense += out * inner - a.numel() - b.numel()          # the layer as a dense weight
            factored_now += r * (out + inner) - a.numel() - b.numel()  # the layer at its A/B rank
        compressed = sum(p.numel() for p in ex.module.parameters()) + factored_now
        return {"ab": {"phase": phase_at(self.step, self.options), "steps": self.step, "role": getattr(self, "role", None),
                       "ranks": dict(self.ranks), "params": compressed, "dense_params": dense,
                       "compression": dense / compressed}}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.step, "since_switch": self.since_switch, "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("steps", 0)
        self.since_switch = state.get("since_switch", 0)
        self.ranks = dict(state.get("ranks", {}))


def _max() -> Any:
    import torch.distributed as dist

    return dist.ReduceOp.MAX
