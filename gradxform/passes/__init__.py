"""How the graph changes: the pass base, registry, pipeline resolution, manager, and the passes."""

from .base import COMPOSITES, PASSES, Composite, Pass, PassResult, register, register_composite
from .pipeline import compiled_schedule, describe_pass, resolve_pipeline

__all__ = ["PASSES", "COMPOSITES", "Composite", "Pass", "PassResult", "compiled_schedule", "describe_pass",
           "register", "register_composite", "resolve_pipeline"]
