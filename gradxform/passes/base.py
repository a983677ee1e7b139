"""Passes as small declared units: a registry name, typed options, ``run(gm, ctx) -> PassResult``.

This module does not import torch, so that ``gradxform passes`` answers at once; a pass imports
what it needs inside ``run``. Options and the pipeline grammar are in :mod:`gradxform.options`;
resolving pipeline text into passes is :mod:`gradxform.passes.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..options import NoOptions, describe, option


@dataclass
class PassResult:
    """What a pass returns: the module, whether it changed, notes for the report, and data."""

    module: Any
    changed: bool
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``Options`` and implement ``run``.

    ``preserves_function``: the PassManager checks that outputs are unchanged on the example inputs.
    ``whole_model``: the pass sees a staged model whole (``split``); other passes run once per stage.
    ``schedule``: the training schedule the pass compiles for (schedule text, e.g. ``petra``), or
    ``None`` when it leaves that to the passes around it; :meth:`compiles_for` may refine it from the
    options. The compile records the last one named in the pipeline; ``--schedule auto`` trains with it.

    Metadata: after a pass that changed the graph, the manager re-propagates shapes when any node
    lacks ``meta['val']``. A pass that changes what an existing node computes must therefore drop
    that node's ``val`` (new nodes start without one).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    preserves_function: ClassVar[bool] = True
    whole_model: ClassVar[bool] = False
    schedule: ClassVar[str | None] = None

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: Any, ctx: Any) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return describe(self.name, self.options)

    def compiles_for(self) -> str | None:
        """The schedule this pass, with these options, prepares the model for (None: no opinion)."""
        return self.schedule


@dataclass
class Composite:
    """A named pipeline for a whole method (``petra`` = reversible + split)."""

    name: str
    summary: str
    expansion: str
    # options of the composite forwarded to its parts: option -> pass name
    routes: dict[str, str] = field(default_factory=dict)
    schedule: str | None = None     # the schedule the whole method trains with (overrides its parts')


PASSES: dict[str, type[Pass]] = {}
COMPOSITES: dict[str, Composite] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under ``cls.name``."""
    if not cls.name or cls.name in PASSES or cls.name in COMPOSITES:
        raise ValueError(f"pass name '{cls.name}' is empty or taken")
    PASSES[cls.name] = cls
    return cls


def register_composite(composite: Composite) -> Composite:
    if composite.name in PASSES or composite.name in COMPOSITES:
        raise ValueError(f"pass name '{composite.name}' is taken")
    COMPOSITES[composite.name] = composite
    return composite


__all__ = ["Pass", "PassResult", "Composite", "option", "NoOptions", "register", "register_composite", "PASSES",
           "COMPOSITES"]
