"""The modules that passes insert: the staged container, reversible and Moonwalk chains, F³ feedback
connectors, heads, Highway layers, low-rank factors. They call the engines of :mod:`gradxform.autodiff`."""

from .feedback import FeedbackConnector
from .moonwalk import MoonwalkChain
from .reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain, StoredInputBlock
from .staged import StagedModule

__all__ = ["StagedModule", "ReversibleChain", "StoredInputBlock", "MoonwalkChain", "LeapfrogCoupling",
           "MomentumCoupling", "FeedbackConnector"]
