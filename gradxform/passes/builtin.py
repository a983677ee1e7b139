"""Importing this module registers gradxform's built-in passes and composites."""

from . import highway, lowrank, reversible, split  # noqa: F401
from .base import Composite, register_composite

register_composite(Composite(
    "petra", "reversible residual chains cut into balanced pipeline stages, for the PETRA schedule",
    "reversible,split{stages=4}",
    routes={"stages": "split", "balance": "split", "coupling": "reversible", "gamma": "reversible",
            "merge": "reversible", "store_inputs": "reversible"}))
