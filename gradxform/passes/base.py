"""Passes as small declared units: a registry name, typed options, ``run(gm, ctx) -> PassResult``.

This module does not import torch, so that ``gradxform passes`` answers at once; a pass imports
what it needs inside ``run``.

Pipeline text is MLIR-like: ``lowrank{rank=0.25},split{stages=4,balance=flops}``. Pass names are
separated by commas; options go in braces as ``key=value``; a list option takes further bare values
(``split{at=layer2,layer3}``). Errors point at the character and suggest the nearest name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from ..errors import PipelineError, did_you_mean, nearest


def option(default: Any, doc: str, **kw: Any) -> Any:
    """A pass option: its default and the one-line doc ``gradxform passes`` prints."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class NoOptions:
    pass


@dataclass
class PassResult:
    """What a pass returns: the module, whether it changed, notes for the report, and data."""

    module: Any
    changed: bool
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set ``name``, ``summary``, ``Options`` and implement ``run``.

    ``preserves_function``: the PassManager checks that outputs are unchanged on the example inputs.
    ``whole_model``: the pass sees a staged model whole (``split``); other passes run once per stage.

    Metadata: after a pass that changed the graph, the manager re-propagates shapes when any node
    lacks ``meta['val']``. A pass that changes what an existing node computes must therefore drop
    that node's ``val`` (new nodes start without one).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    preserves_function: ClassVar[bool] = True
    whole_model: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def run(self, gm: Any, ctx: Any) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        opts = ",".join(f"{f.name}={_show(getattr(self.options, f.name))}"
                        for f in dataclasses.fields(self.options)
                        if getattr(self.options, f.name) != _default(f))
        return f"{self.name}{{{opts}}}" if opts else self.name


@dataclass
class Composite:
    """A named pipeline for a whole method (``petra`` = reversible + split)."""

    name: str
    summary: str
    expansion: str
    # options of the composite forwarded to its parts: option -> pass name
    routes: dict[str, str] = field(default_factory=dict)


PASSES: dict[str, type[Pass]] = {}
COMPOSITES: dict[str, Composite] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under ``cls.name``."""
    if not cls.name or cls.name in PASSES or cls.name in COMPOSITES:
        raise ValueError(f"pass name '{cls.name}' is empty or taken")
    PASSES[cls.name] = cls
    return cls


def register_composite(composite: Composite) -> Composite:
    if composite.name in PASSES or composite.name in COMPOSITES:
        raise ValueError(f"pass name '{composite.name}' is taken")
    COMPOSITES[composite.name] = composite
    return composite


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if v else "(none)"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


# ----------------------------------------------------------------------------------------- options

def option_types(options_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(options_cls)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, get_args(tp)))
    if origin in (list, tuple):
        return f"list[{type_name(get_args(tp)[0])}]"
    if origin in (Union, types.UnionType):
        return "|".join(type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def is_list_type(tp: Any) -> bool:
    return get_origin(tp) in (list, tuple)


def convert(value: str, tp: Any) -> Any:
    """Parse one option value (text) into ``tp``; raises ValueError with the expected form."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value.lower() == "none" and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except ValueError:
                continue
        raise ValueError(f"expected {type_name(tp)}")
    if tp is bool:
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        if re.fullmatch(r"[+-]?\d+", value):
            return int(value)
        raise ValueError("expected an integer")
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is str:
        return value
    raise ValueError(f"unsupported option type {tp}")


# ---------------------------------------------------------------------------------------- pipeline

@dataclass
class PipelineItem:
    name: str
    options: dict[str, list[str]]   # raw text values
    position: int                   # where the name starts in the text
    option_positions: dict[str, int] = field(default_factory=dict)


def _caret(text: str, pos: int, width: int = 1) -> str:
    return f"\n  {text}\n  {' ' * pos}{'^' * max(1, width)}"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def parse_pipeline(text: str) -> list[PipelineItem]:
    """Split pipeline text into items (names and raw option values), checking its syntax."""
    items: list[PipelineItem] = []
    i, n = 0, len(text)

    def skip_ws() -> None:
        nonlocal i
        while i < n and text[i].isspace():
            i += 1

    skip_ws()
    if i == n:
        raise PipelineError("empty pipeline", hint="name at least one pass, e.g. split{stages=4}")
    while True:
        skip_ws()
        m = _NAME.match(text, i)
        if not m:
            raise PipelineError("expected a pass name" + _caret(text, i),
                                hint="pass names are letters, digits, '-' and '_'")
        item = PipelineItem(m.group(), {}, i)
        i = m.end()
        skip_ws()
        if i < n and text[i] == "{":
            close = text.find("}", i)
            if close < 0:
                raise PipelineError("unclosed '{'" + _caret(text, i), hint="close the options with '}'")
            _parse_options(text, i + 1, close, item)
            i = close + 1
            skip_ws()
        items.append(item)
        if i == n:
            return items
        if text[i] != ",":
            raise PipelineError(f"unexpected '{text[i]}'" + _caret(text, i),
                                hint="separate passes with ',' and put options in {key=value}")
        i += 1


def _parse_options(text: str, start: int, end: int, item: PipelineItem) -> None:
    last_key: str | None = None
    pos = start
    for part in text[start:end].split(","):
        raw = part.strip()
        at = pos + (len(part) - len(part.lstrip()))
        pos += len(part) + 1
        if not raw:
            raise PipelineError("empty option" + _caret(text, at), hint="write key=value")
        if "=" in raw:
            key, _, value = (s.strip() for s in raw.partition("="))
            if not _NAME.fullmatch(key):
                raise PipelineError(f"bad option name '{key}'" + _caret(text, at, len(key)))
            if key in item.options:
                raise PipelineError(f"option '{key}' given twice" + _caret(text, at, len(key)))
            if not value:
                raise PipelineError(f"option '{key}' has no value" + _caret(text, at, len(raw)))
            item.options[key] = [value]
            item.option_positions[key] = at
            last_key = key
        elif last_key is None:
            raise PipelineError(f"'{raw}' has no option name" + _caret(text, at, len(raw)),
                                hint="write key=value")
        else:  # a further value of a list option: split{at=layer2,layer3}
            item.options[last_key].append(raw)


def build_options(cls: type[Pass], raw: dict[str, list[str]], text: str = "",
                  positions: dict[str, int] | None = None) -> Any:
    """Typed options for ``cls`` from raw text values, with errors naming the option."""
    types = option_types(cls.Options)
    values: dict[str, Any] = {}
    positions = positions or {}
    for key, texts in raw.items():
        where = _caret(text, positions[key], len(key)) if text and key in positions else ""
        if key not in types:
            raise PipelineError(f"pass '{cls.name}' has no option '{key}'" + where,
                                hint=did_you_mean(key, types) if types else f"'{cls.name}' takes no options")
        tp = types[key]
        try:
            if is_list_type(tp):
                elem = get_args(tp)[0]
                values[key] = tuple(convert(t, elem) for t in texts)
            elif len(texts) > 1:
                raise ValueError(f"takes one value, got {len(texts)}")
            else:
                values[key] = convert(texts[0], tp)
        except ValueError as e:
            raise PipelineError(f"option '{key}' of '{cls.name}': {e}, got '{','.join(texts)}'" + where,
                                hint=f"{key}: {type_name(tp)}") from None
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise PipelineError(f"options of '{cls.name}': {e}") from None
    return options


def _all_names() -> list[str]:
    return sorted(PASSES) + sorted(COMPOSITES)


def resolve_pipeline(text: str) -> list[Pass]:
    """Pipeline text -> pass instances, composites expanded, every option typed."""
    load_builtin_passes()
    passes: list[Pass] = []
    for item in parse_pipeline(text):
        if item.name in COMPOSITES:
            passes.extend(_expand(COMPOSITES[item.name], item, text))
        elif item.name in PASSES:
            cls = PASSES[item.name]
            passes.append(cls(build_options(cls, item.options, text, item.option_positions)))
        else:
            raise PipelineError(f"unknown pass '{item.name}'" + _caret(text, item.position, len(item.name)),
                                hint=did_you_mean(item.name, _all_names()))
    return passes


def _expand(comp: Composite, item: PipelineItem, text: str) -> list[Pass]:
    for key in item.options:
        if key not in comp.routes:
            raise PipelineError(f"'{comp.name}' has no option '{key}'"
                                + _caret(text, item.option_positions[key], len(key)),
                                hint=did_you_mean(key, comp.routes) if comp.routes else "it takes no options")
    passes = []
    for sub in parse_pipeline(comp.expansion):
        opts = dict(sub.options)
        opts.update({k: v for k, v in item.options.items() if comp.routes[k] == sub.name})
        cls = PASSES[sub.name]
        passes.append(cls(build_options(cls, opts)))
    return passes


def load_builtin_passes() -> None:
    """Import the modules that register gradxform's passes (cheap: they import torch lazily)."""
    from . import builtin  # noqa: F401


def describe_pass(name: str) -> dict[str, Any]:
    """Name, summary and options (type, default, doc) of a pass or composite, for ``gradxform passes``."""
    load_builtin_passes()
    if name in COMPOSITES:
        comp = COMPOSITES[name]
        preset = {item.name: item.options for item in parse_pipeline(comp.expansion)}
        opts = []
        for k, target in comp.routes.items():
            part = next(o for o in describe_pass(target)["options"] if o["name"] == k)
            default = ",".join(preset.get(target, {}).get(k, [])) or part["default"]
            opts.append({"name": k, "type": part["type"], "default": default,
                         "doc": f"{part['doc']} (forwarded to '{target}')"})
        return {"name": name, "summary": comp.summary, "composite": comp.expansion, "options": opts}
    if name not in PASSES:
        raise PipelineError(f"unknown pass '{name}'", hint=did_you_mean(name, _all_names()))
    cls = PASSES[name]
    types = option_types(cls.Options)
    opts = [{"name": f.name, "type": type_name(types[f.name]), "default": _show(_default(f)),
             "doc": f.metadata.get("doc", "")} for f in dataclasses.fields(cls.Options)]
    return {"name": name, "summary": cls.summary, "options": opts,
            "preserves_function": cls.preserves_function, "doc": (cls.__doc__ or "").strip()}


__all__ = ["Pass", "PassResult", "Composite", "option", "register", "register_composite", "PASSES",
           "COMPOSITES", "parse_pipeline", "resolve_pipeline", "build_options", "describe_pass", "nearest"]
