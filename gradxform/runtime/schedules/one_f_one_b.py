"""``1f1b``: one forward, one backward (PipeDream-flush): the bubble of GPipe with fewer micro-batches
in flight (stage j holds at most J - j).

In one process on gradxform's own tick loop; across ranks through ``torch.distributed.pipelining``'s
``Schedule1F1B`` (:mod:`gradxform.runtime.pipelining`).
"""

from __future__ import annotations

from .base import register
from .families import SynchronousPipeline
from .ticks import one_f_one_b


@register
class OneFOneB(SynchronousPipeline):
    name = "1f1b"
    summary = "synchronous pipeline: warm-up forwards, then one forward one backward; one update per step"
    table = staticmethod(one_f_one_b)
