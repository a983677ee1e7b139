"""Importing this module registers gradxform's built-in passes and composites."""

from . import aux_heads, f3, grow, highway, lowrank, moonwalk, reversible, split  # noqa: F401
from .base import Composite, register_composite

register_composite(Composite(
    "petra", "reversible residual chains cut into balanced pipeline stages, for the PETRA schedule",
    "reversible,split{stages=4,recompute=true}",
    routes={"stages": "split", "balance": "split", "recompute": "split", "coupling": "reversible", "gamma": "reversible",
            "merge": "reversible", "store_inputs": "reversible"}, schedule="petra"))

_HEADS = {"stages": "split", "balance": "split", "head": "aux-heads", "width": "aux-heads"}
register_composite(Composite(
    "dgl", "stages with auxiliary heads, each trained on its own local loss (the local schedule)",
    "split{stages=2},aux-heads{schedule=local}", routes=dict(_HEADS), schedule="local"))
register_composite(Composite(
    "fwd-local", "stages with auxiliary heads whose gradients guide forward gradients (the forward-grad schedule)",
    "split{stages=2},aux-heads{schedule=forward-grad}", routes=dict(_HEADS), schedule="forward-grad"))
