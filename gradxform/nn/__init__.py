"""The modules that passes insert: the staged container, reversible couplings and chains, F³ connectors."""

from .feedback import FeedbackConnector
from .reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain, StoredInputBlock
from .staged import StagedModule

# Modules the fx tracer keeps whole (their forward holds custom autograd logic).
LEAF_MODULES = (ReversibleChain, StoredInputBlock, FeedbackConnector)

__all__ = ["StagedModule", "ReversibleChain", "StoredInputBlock", "LeapfrogCoupling", "MomentumCoupling",
           "FeedbackConnector", "LEAF_MODULES"]
