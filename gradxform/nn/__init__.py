"""The modules that passes insert: the staged container (and, with later passes, couplings,
low-rank layers and auxiliary heads)."""

from .staged import StagedModule

__all__ = ["StagedModule"]
