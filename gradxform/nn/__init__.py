"""The modules that passes insert: the staged container, reversible couplings and chains."""

from .moonwalk import MoonwalkChain
from .reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain, StoredInputBlock
from .staged import StagedModule

# Modules the fx tracer keeps whole (their forward holds custom autograd logic).
LEAF_MODULES = (ReversibleChain, StoredInputBlock, MoonwalkChain)

__all__ = ["StagedModule", "ReversibleChain", "StoredInputBlock", "MoonwalkChain", "LeapfrogCoupling",
           "MomentumCoupling", "LEAF_MODULES"]
