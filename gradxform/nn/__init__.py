"""The modules that passes insert: the staged container, reversible couplings and chains."""

from .reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain, StoredInputBlock
from .staged import StagedModule

# Modules the fx tracer keeps whole (their forward holds custom autograd logic).
LEAF_MODULES = (ReversibleChain, StoredInputBlock)

__all__ = ["StagedModule", "ReversibleChain", "StoredInputBlock", "LeapfrogCoupling", "MomentumCoupling", "LEAF_MODULES"]
