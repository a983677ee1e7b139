"""``gpipe``: all M forwards of a step, then all M backwards, then one update (GPipe).

In one process on gradxform's own tick loop; across ranks through ``torch.distributed.pipelining``'s
``ScheduleGPipe`` (:mod:`gradxform.runtime.pipelining`). Bubble (J-1)/(M+J-1).
"""

from __future__ import annotations

from .base import register
from .families import SynchronousPipeline
from .ticks import gpipe


@register
class GPipe(SynchronousPipeline):
    name = "gpipe"
    summary = "synchronous pipeline: all forwards, all backwards, one update per M micro-batches"
    table = staticmethod(gpipe)
