"""How the graph changes: the pass base, registry, pipeline parser, manager, and the passes."""

from .base import COMPOSITES, PASSES, Pass, PassResult, describe_pass, register, resolve_pipeline

__all__ = ["PASSES", "COMPOSITES", "Pass", "PassResult", "describe_pass", "register", "resolve_pipeline"]
