"""Schedules as registered objects: ``petra``, ``stash``, ``dsp``, ``delayed-exact``, ``backprop``,
``gpipe``, ``1f1b``, ``local``, ``forward-grad``, ``moonwalk``, and ``f3`` / ``dfa`` / ``drtp`` /
``llo`` (one module for the four), and ``ab`` (AB-training, data parallel), each a module here (see :mod:`.base` for what a schedule is).

``make_schedule("forward-grad{tangents=4}")`` parses schedule text with the pipeline grammar and
returns a Schedule instance; ``SCHEDULES`` maps names to classes.
"""

from __future__ import annotations

import sys
from typing import Any

from ...errors import PipelineError, did_you_mean
from ...options import build_options, caret, describe_options, parse_pipeline, validated
from . import (ab, backprop, delayed_exact, dsp, feedback, forward_grad, gpipe, local, moonwalk, one_f_one_b,  # noqa: F401
               petra, stash)
from .base import SCHEDULES, Action, Layout, Message, Policy, Schedule, TickTable, register

__all__ = ["SCHEDULES", "Action", "Layout", "Message", "Policy", "Schedule", "TickTable", "register",
           "make_schedule", "describe_schedule"]


def make_schedule(spec: str | Schedule, **overrides: Any) -> Schedule:
    """A Schedule from text (``petra``, ``'forward-grad{guess=random,tangents=4}'``) or an instance;
    ``overrides`` set options by name (an option the schedule does not have is an error)."""
    if isinstance(spec, Schedule):
        schedule = spec
    else:
        items = parse_pipeline(spec, what="schedule")
        if len(items) > 1:
            raise PipelineError(f"one schedule at a time, got {len(items)}"
                                + caret(spec, items[1].position, len(items[1].name)),
                                hint="a model trains with one schedule; passes go in --pass")
        (item,) = items
        cls = SCHEDULES.get(item.name)
        if cls is None:
            raise PipelineError(f"unknown schedule '{item.name}'" + caret(spec, item.position, len(item.name)),
                                hint=did_you_mean(item.name, SCHEDULES))
        schedule = cls(build_options(cls, item.options, spec, item.option_positions, what="schedule"))
    if overrides:
        opts = schedule.options
        known = {o["name"] for o in describe_options(type(opts))}
        for key, value in overrides.items():
            if key not in known:
                raise PipelineError(f"schedule '{schedule.name}' has no option '{key}'",
                                    hint=f"its options: {', '.join(sorted(known)) or 'none'}")
        values = {o: getattr(opts, o) for o in known}
        values.update(overrides)
        schedule = type(schedule)(validated(type(schedule), type(opts)(**values), what="schedule"))
    return schedule


def describe_schedule(name: str) -> dict[str, Any]:
    """Name, summary, family, message layout and options of a schedule, for ``gradxform schedules``."""
    cls = SCHEDULES.get(name)
    if cls is None:
        raise PipelineError(f"unknown schedule '{name}'", hint=did_you_mean(name, SCHEDULES))
    return {"name": name, "summary": cls.summary, "family": cls.family,
            "doc": (sys.modules[cls.__module__].__doc__ or "").strip(),
            "forward": list(cls.layout.forward), "backward": list(cls.layout.backward),
            "options": describe_options(cls.Options)}
