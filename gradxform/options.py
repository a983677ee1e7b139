"""Typed options and the pipeline grammar, shared by passes and schedules.

Pipeline text is MLIR-like: ``lowrank{rank=0.25},split{stages=4,balance=flops}``. Names are separated
by commas; options go in braces as ``key=value``; a list option takes further bare values
(``split{at=layer2,layer3}``). A name is letters, digits, ``-`` and ``_`` and may start with a digit
(the ``1f1b`` schedule). Errors point at the character and suggest the nearest name.

A search space (``gradxform search``) is the same text with two additions, parsed by the same code:
an option's value may be a *domain* -- ``2..4`` or ``1e-3..1e-1:log`` (a range, both ends included),
``32|64|128`` (a choice) -- and ``;`` separates alternatives (:func:`split_top_level`).

Options are dataclasses whose fields are made with :func:`option` (a default and the one-line doc that
``gradxform passes`` and ``gradxform schedules`` print); the field's type annotation decides how the
text is parsed (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, unions, ``tuple[T, ...]``).

This module does not import torch, so that listing passes and parsing a pipeline answer at once.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from .errors import PipelineError, did_you_mean


def option(default: Any, doc: str, **kw: Any) -> Any:
    """An option: its default and the one-line doc the listings print."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class NoOptions:
    pass


def show(v: Any) -> str:
    """An option value as pipeline text."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if v else "(none)"
    return str(v).lower() if isinstance(v, bool) else str(v)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def describe(name: str, options: Any) -> str:
    """``name{key=value,...}`` with only the options that differ from their defaults."""
    opts = ",".join(f"{f.name}={show(getattr(options, f.name))}" for f in dataclasses.fields(options)
                    if getattr(options, f.name) != default_of(f))
    return f"{name}{{{opts}}}" if opts else name


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


def describe_options(options_cls: type) -> list[dict[str, str]]:
    """Name, type, default and doc of every option, for the listings."""
    types_ = option_types(options_cls)
    return [{"name": f.name, "type": type_name(types_[f.name]), "default": show(default_of(f)),
             "doc": f.metadata.get("doc", "")} for f in dataclasses.fields(options_cls)]


# ---------------------------------------------------------------------------------------- grammar

@dataclass
class PipelineItem:
    name: str
    options: dict[str, list[str]]   # raw text values
    position: int                   # where the name starts in the text
    option_positions: dict[str, int] = field(default_factory=dict)
    value_positions: dict[str, list[int]] = field(default_factory=dict)  # where each raw value starts


def caret(text: str, pos: int, width: int = 1) -> str:
    return f"\n  {text}\n  {' ' * pos}{'^' * max(1, width)}"


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def parse_pipeline(text: str, what: str = "pass", start: int = 0, end: int | None = None) -> list[PipelineItem]:
    """Split pipeline text into items (names and raw option values), checking its syntax.

    ``start``/``end`` parse one span of ``text`` (an alternative of a search space); positions and
    carets stay those of the whole text."""
    items: list[PipelineItem] = []
    i, n = start, len(text) if end is None else end

    def skip_ws() -> None:
        nonlocal i
        while i < n and text[i].isspace():
            i += 1

    skip_ws()
    if i == n:
        raise PipelineError("empty pipeline" if what == "pass" else f"empty {what}",
                            hint="name at least one pass, e.g. split{stages=4}" if what == "pass"
                            else "e.g. petra or 'forward-grad{tangents=4}'")
    while True:
        skip_ws()
        m = _NAME.match(text, i)
        if not m:
            raise PipelineError(f"expected a {what} name" + caret(text, i),
                                hint=f"{what} names are letters, digits, '-' and '_'")
        item = PipelineItem(m.group(), {}, i)
        i = m.end()
        skip_ws()
        if i < n and text[i] == "{":
            close = _matching(text, i)
            if close < 0 or close >= n:
                raise PipelineError("unclosed '{'" + caret(text, i), hint="close the options with '}'")
            _parse_options(text, i + 1, close, item)
            i = close + 1
            skip_ws()
        items.append(item)
        if i == n:
            return items
        if text[i] != ",":
            raise PipelineError(f"unexpected '{text[i]}'" + caret(text, i),
                                hint=f"separate {what}es with ',' and put options in {{key=value}}"
                                if what == "pass" else "put options in {key=value}")
        i += 1


def _matching(text: str, open_at: int) -> int:
    """The index of the '}' closing the '{' at ``open_at`` (values may nest braces:
    ``aux-heads{schedule=forward-grad{tangents=2}}``), or -1."""
    depth = 0
    for k in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return k
    return -1


def _top_level_parts(body: str, sep: str = ",") -> list[str]:
    """``body`` split at the ``sep`` outside nested braces."""
    return [body[a:b] for a, b in split_top_level(body, sep)]


def split_top_level(text: str, sep: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The spans ``(start, end)`` of ``text[start:end]`` between the ``sep`` outside braces."""
    end = len(text) if end is None else end
    spans, depth, at = [], 0, start
    for k in range(start, end):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if text[k] == sep and depth == 0:
            spans.append((at, k))
            at = k + 1
    spans.append((at, end))
    return spans


def _parse_options(text: str, start: int, end: int, item: PipelineItem) -> None:
    last_key: str | None = None
    pos = start
    for part in _top_level_parts(text[start:end]):
        raw = part.strip()
        at = pos + (len(part) - len(part.lstrip()))
        pos += len(part) + 1
        if not raw:
            raise PipelineError("empty option" + caret(text, at), hint="write key=value")
        if "=" in raw:
            key, _, value = (s.strip() for s in raw.partition("="))
            if not _KEY.fullmatch(key):
                raise PipelineError(f"bad option name '{key}'" + caret(text, at, len(key)))
            if key in item.options:
                raise PipelineError(f"option '{key}' given twice" + caret(text, at, len(key)))
            if not value:
                raise PipelineError(f"option '{key}' has no value" + caret(text, at, len(raw)))
            item.options[key] = [value]
            item.option_positions[key] = at
            item.value_positions[key] = [at + raw.index("=") + 1 + _lead(raw.partition("=")[2])]
            last_key = key
        elif last_key is None:
            raise PipelineError(f"'{raw}' has no option name" + caret(text, at, len(raw)),
                                hint="write key=value")
        else:  # a further value of a list option: split{at=layer2,layer3}
            item.options[last_key].append(raw)
            item.value_positions[last_key].append(at)


def _lead(s: str) -> int:
    return len(s) - len(s.lstrip())


def build_options(cls: Any, raw: dict[str, list[str]], text: str = "",
                  positions: dict[str, int] | None = None, what: str = "pass") -> Any:
    """Typed options for ``cls`` (a pass or schedule class: ``name`` and ``Options``) from raw text
    values, with errors naming the option."""
    types_ = option_types(cls.Options)
    values: dict[str, Any] = {}
    positions = positions or {}
    for key, texts in raw.items():
        where = caret(text, positions[key], len(key)) if text and key in positions else ""
        if key not in types_:
            raise PipelineError(f"{what} '{cls.name}' has no option '{key}'" + where,
                                hint=did_you_mean(key, types_) if types_ else f"'{cls.name}' takes no options")
        tp = types_[key]
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
    return validated(cls, cls.Options(**values), what)


def validated(cls: Any, options: Any, what: str = "pass") -> Any:
    """``options`` after its own ``validate()`` (if it has one), a ValueError becoming a PipelineError."""
    check = getattr(options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise PipelineError(f"options of {what} '{cls.name}': {e}") from None
    return options


# ------------------------------------------------------------------------------- search domains

@dataclass(frozen=True)
class Choice:
    """``a|b|c``: one of the values, kept as written (each is checked against the option's type)."""

    texts: tuple[str, ...]

    def __str__(self) -> str:
        return "|".join(self.texts)


@dataclass(frozen=True)
class Range:
    """``low..high`` (both included), ``:log`` for uniform in log space; integer for int options."""

    low: float
    high: float
    integer: bool
    log: bool = False

    def __str__(self) -> str:
        text = f"{self.low!r}..{self.high!r}" if not self.integer else f"{int(self.low)}..{int(self.high)}"
        return text + (":log" if self.log else "")

    def text(self, value: float) -> str:
        """A sampled value as option text (``repr`` of a float reads back to the same float)."""
        return str(int(value)) if self.integer else repr(float(value))


def numeric_kind(tp: Any) -> type | None:
    """``int`` or ``float`` when ``tp`` is one (or an optional one), else None: what a range needs."""
    if tp in (int, float):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        kinds = {a for a in get_args(tp) if a is not type(None)}
        if len(kinds) == 1:
            return numeric_kind(kinds.pop())
    return None


def parse_domain(text: str, at: int, value: str, tp: Any, where: str) -> str | Choice | Range:
    """A searched option value: the value text itself when it is one value, a :class:`Choice` or a
    :class:`Range`, each part checked against ``tp``. ``value`` starts at ``at`` in ``text`` (carets
    point into ``text``); ``where`` names the option in messages (``option 'lr' of 'train'``)."""
    choices = split_top_level(value, "|")
    dots = _top_level_find(value, "..")
    if len(choices) > 1 and dots >= 0:
        raise PipelineError(f"{where}: a value is a range or a choice, not both" + caret(text, at + dots, 2),
                            hint="write lo..hi or a|b|c")
    if len(choices) > 1:
        texts = []
        for a, b in choices:
            part = value[a:b].strip()
            pos = at + a + _lead(value[a:b])
            if not part:
                raise PipelineError(f"{where}: empty choice" + caret(text, at + a if a < len(value) else at + a - 1),
                                    hint="write a|b|c")
            if part in texts:
                raise PipelineError(f"{where}: choice '{part}' given twice" + caret(text, pos, len(part)))
            _typed(part, tp, text, pos, where)
            texts.append(part)
        return Choice(tuple(texts))
    if dots < 0:
        _typed(value, tp, text, at, where)
        return value
    kind = numeric_kind(tp)
    if kind is None:
        raise PipelineError(f"{where}: a range needs a number option, this one is {type_name(tp)}"
                            + caret(text, at, len(value)), hint="choose among values with a|b|c")
    low_text, rest = value[:dots], value[dots + 2:]
    high_text, colon, scale = rest.partition(":")
    high_at = at + dots + 2
    if scale.strip() not in ("", "log") or (colon and not scale.strip()):
        pos = high_at + len(high_text) + 1
        raise PipelineError(f"{where}: unknown range scale '{scale.strip()}'" + caret(text, pos, max(1, len(scale))),
                            hint="lo..hi (uniform) or lo..hi:log")
    if not low_text.strip():
        raise PipelineError(f"{where}: the range has no low end" + caret(text, at), hint="write lo..hi")
    if not high_text.strip():
        raise PipelineError(f"{where}: the range has no high end" + caret(text, high_at - 2, 2), hint="write lo..hi")
    low = _typed(low_text.strip(), kind, text, at + _lead(low_text), where)
    high = _typed(high_text.strip(), kind, text, high_at + _lead(high_text), where)
    log = scale.strip() == "log"
    if not low < high:
        raise PipelineError(f"{where}: the range {low_text.strip()}..{high_text.strip()} is empty or reversed"
                            + caret(text, at, len(value)), hint="the low end comes first and is smaller")
    if log and low <= 0:
        raise PipelineError(f"{where}: a log range needs a positive low end, got {low_text.strip()}"
                            + caret(text, at, len(low_text)))
    return Range(float(low) if kind is float else int(low), float(high) if kind is float else int(high),
                 integer=kind is int, log=log)


def _top_level_find(value: str, needle: str) -> int:
    depth = 0
    for k in range(len(value)):
        depth += {"{": 1, "}": -1}.get(value[k], 0)
        if depth == 0 and value.startswith(needle, k):
            return k
    return -1


def _typed(value: str, tp: Any, text: str, at: int, where: str) -> Any:
    try:
        return convert(value, get_args(tp)[0] if is_list_type(tp) else tp)
    except ValueError as e:
        raise PipelineError(f"{where}: {e}, got '{value}'" + caret(text, at, len(value)),
                            hint=type_name(tp)) from None
