"""The modules that passes insert: the staged container, reversible couplings and chains."""

from .reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain
from .staged import StagedModule

# Modules the fx tracer keeps whole (their forward holds custom autograd logic).
LEAF_MODULES = (ReversibleChain,)

__all__ = ["StagedModule", "ReversibleChain", "LeapfrogCoupling", "MomentumCoupling", "LEAF_MODULES"]
