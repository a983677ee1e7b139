"""Pipeline text -> pass instances: composites expanded, every option typed, the schedule it names.

Importing this module registers gradxform's built-in passes (their modules import torch lazily, so
this stays fast enough for ``gradxform passes``).
"""

from __future__ import annotations

from typing import Any

from ..errors import PipelineError, did_you_mean
from ..options import PipelineItem, build_options, caret, describe_options, parse_pipeline
from . import builtin  # noqa: F401  (registers the passes and composites)
from .base import COMPOSITES, PASSES, Composite, Pass


def _all_names() -> list[str]:
    return sorted(PASSES) + sorted(COMPOSITES)


def _unknown(item: PipelineItem, text: str) -> PipelineError:
    return PipelineError(f"unknown pass '{item.name}'" + caret(text, item.position, len(item.name)),
                         hint=did_you_mean(item.name, _all_names()))


def resolve_pipeline(text: str) -> list[Pass]:
    """Pipeline text -> pass instances, composites expanded, every option typed."""
    passes: list[Pass] = []
    for item in parse_pipeline(text):
        if item.name in COMPOSITES:
            passes.extend(_expand(COMPOSITES[item.name], item, text))
        elif item.name in PASSES:
            cls = PASSES[item.name]
            passes.append(cls(build_options(cls, item.options, text, item.option_positions)))
        else:
            raise _unknown(item, text)
    return passes


def compiled_schedule(text: str) -> str | None:
    """The schedule a pipeline compiles for: the last one its composites or passes name."""
    named = None
    for item in parse_pipeline(text):
        if item.name in COMPOSITES and COMPOSITES[item.name].schedule:
            named = COMPOSITES[item.name].schedule
            continue
        for p in (_expand(COMPOSITES[item.name], item, text) if item.name in COMPOSITES else
                  [PASSES[item.name](build_options(PASSES[item.name], item.options))]
                  if item.name in PASSES else []):
            named = p.compiles_for() or named
    return named


def _expand(comp: Composite, item: PipelineItem, text: str) -> list[Pass]:
    for key in item.options:
        if key not in comp.routes:
            raise PipelineError(f"'{comp.name}' has no option '{key}'"
                                + caret(text, item.option_positions[key], len(key)),
                                hint=did_you_mean(key, comp.routes) if comp.routes else "it takes no options")
    passes = []
    for sub in parse_pipeline(comp.expansion):
        opts = dict(sub.options)
        opts.update({k: v for k, v in item.options.items() if comp.routes[k] == sub.name})
        cls = PASSES[sub.name]
        passes.append(cls(build_options(cls, opts)))
    return passes


def describe_pass(name: str) -> dict[str, Any]:
    """Name, summary and options (type, default, doc) of a pass or composite, for ``gradxform passes``."""
    if name in COMPOSITES:
        comp = COMPOSITES[name]
        preset = {item.name: item.options for item in parse_pipeline(comp.expansion)}
        opts = []
        for k, target in comp.routes.items():
            part = next(o for o in describe_pass(target)["options"] if o["name"] == k)
            default = ",".join(preset.get(target, {}).get(k, [])) or part["default"]
            opts.append({"name": k, "type": part["type"], "default": default,
                         "doc": f"{part['doc']} (forwarded to '{target}')"})
        return {"name": name, "summary": comp.summary, "composite": comp.expansion, "options": opts,
                "schedule": comp.schedule or compiled_schedule(comp.expansion)}
    if name not in PASSES:
        raise PipelineError(f"unknown pass '{name}'", hint=did_you_mean(name, _all_names()))
    cls = PASSES[name]
    return {"name": name, "summary": cls.summary, "options": describe_options(cls.Options),
            "preserves_function": cls.preserves_function, "doc": (cls.__doc__ or "").strip(),
            "schedule": cls.schedule}


__all__ = ["resolve_pipeline", "compiled_schedule", "describe_pass"]
