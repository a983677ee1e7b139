"""The search space: pipeline text whose option values may be ranges and choices.

::

    petra{stages=2..4,coupling=leapfrog|momentum};dgl{stages=2..4};train{lr=1e-3..1e-1:log,batch_size=32|64}

``;`` separates *alternatives*. An alternative that names passes is a *method*: its pipeline, and
optionally its own ``train{...}`` (fields of :class:`gradxform.runtime.train.TrainConfig`: ``lr``,
``batch_size``, ``optimizer``, ``schedule``, ...) and ``schedule{...}`` (options of the schedule the
trial trains with: ``accumulate``, ``tangents``, ...). An alternative made only of ``train{}`` and
``schedule{}`` groups is *shared*: it applies to every method, and a method's own group wins on the
keys it sets. A space with no pass at all searches the model as it is (the default pipeline).

Values: ``2..4`` (integers 2, 3, 4 for an int option), ``0.1..0.5`` (uniform), ``1e-3..1e-1:log``
(uniform in log space), ``32|64|128`` (a choice, values as written), anything else a fixed value.
The text is parsed by :func:`gradxform.options.parse_pipeline` (the passes' own grammar), and every
value is checked against the option's type before any trial runs.

Parsing needs the option types (passes, schedules and TrainConfig, so torch); a parsed space travels
to the workers as JSON (:meth:`Space.to_json`), and sampling it (:meth:`Space.sample`) needs neither
torch nor the registries.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import GradxformError, PipelineError, did_you_mean
from ..options import (Choice, PipelineItem, Range, build_options, caret, convert, option_types, parse_domain,
                       parse_pipeline, split_top_level)

Value = Union[tuple, Choice, Range]   # fixed value texts (a list option may hold several), or a domain
GROUPS = ("train", "schedule")        # the groups that are not passes

# TrainConfig fields a space may not set, and why
NOT_SEARCHED = {
    "epochs": "the trials' budget: set it with --epochs",
    "data": "every trial must see the same data: set it with --data",
    "out": "each trial writes into --out/trials/NUMBER",
    "resume": "trials start afresh", "overwrite": "trials start afresh",
    "command": "recorded by the search", "run_id": "recorded by the search",
    "checkpoint_every": "a trial keeps only its last epoch's checkpoint",
    "micro_batches": "a schedule option: search it as schedule{micro_batches=...}",
    "accumulate": "a schedule option: search it as schedule{accumulate=...}",
}


@dataclass(frozen=True)
class Knob:
    key: str
    value: Value
    position: int = -1      # where its key starts in the space text (carets)

    @property
    def searched(self) -> bool:
        return not isinstance(self.value, tuple)

    def corner(self) -> str:
        """One admissible value as text: a fixed value, the first choice, the range's low end."""
        v = self.value
        return ",".join(v) if isinstance(v, tuple) else v.texts[0] if isinstance(v, Choice) else v.text(v.low)

    def show(self) -> str:
        v = self.value
        return f"{self.key}={','.join(v) if isinstance(v, tuple) else v}"


@dataclass(frozen=True)
class Group:
    """A pass or composite with its knobs, or a ``train`` / ``schedule`` group."""

    name: str
    knobs: tuple[Knob, ...] = ()

    def show(self) -> str:
        return self.name + ("{" + ",".join(k.show() for k in self.knobs) + "}" if self.knobs else "")


@dataclass(frozen=True)
class Method:
    label: str                      # what the tables and plots call it: pass names joined by '+'
    groups: tuple[Group, ...]       # passes in pipeline order, then its own train / schedule groups

    @property
    def passes(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.name not in GROUPS)

    def show(self) -> str:
        return ",".join(g.show() for g in self.groups)


@dataclass
class Candidate:
    """One sampled configuration: what a trial compiles and trains."""

    method: str
    pipeline: str | None            # None: the default pipeline (the model as it is, one stage)
    train: dict[str, str]           # TrainConfig fields, as option text
    schedule: dict[str, str]        # options of the schedule the trial trains with, as option text
    params: dict[str, Any] = field(default_factory=dict)  # what the sampler chose, by parameter name


@dataclass(frozen=True)
class Space:
    methods: tuple[Method, ...]
    shared: tuple[Group, ...] = ()

    def describe(self) -> str:
        """The space as text; parsing it again gives an equal space."""
        return ";".join([m.show() for m in self.methods if m.passes] + [g.show() for g in self.shared])

    def dimensions(self) -> int:
        n = sum(k.searched for m in self.methods for g in m.groups for k in g.knobs)
        return n + sum(k.searched for g in self.shared for k in g.knobs) + (len(self.methods) > 1)

    # -- sampling ----------------------------------------------------------------------------------
    def knobs(self, method: Method) -> dict[str, tuple[int, Knob]]:
        """Every knob a trial of ``method`` uses, by parameter name (``petra.stages``, ``train.lr``;
        with several methods a method's own groups are prefixed by its label: ``dgl.train.lr``; a
        pass's second use in one pipeline is ``lowrank#2``), with the index of its group in
        ``method.groups`` (-1: a shared group). Shared knobs the method sets itself are left out."""
        several = len(self.methods) > 1
        out: dict[str, tuple[int, Knob]] = {}
        uses: dict[str, int] = {}
        for i, g in enumerate(method.groups):
            uses[g.name] = uses.get(g.name, 0) + 1
            name = g.name if uses[g.name] == 1 else f"{g.name}#{uses[g.name]}"
            prefix = name if not several else method.label if name == method.label else f"{method.label}.{name}"
            for k in g.knobs:
                out[f"{prefix}.{k.key}"] = (i, k)
        own = {(g.name, k.key) for g in method.groups if g.name in GROUPS for k in g.knobs}
        for g in self.shared:
            for k in g.knobs:
                if (g.name, k.key) not in own:
                    out[f"{g.name}.{k.key}"] = (-1, k)
        return out

    def sample(self, trial: Any) -> Candidate:
        """Draw a candidate with an Optuna trial's ``suggest_*`` (see :meth:`knobs` for the names)."""
        method = self.methods[0]
        if len(self.methods) > 1:
            labels = [m.label for m in self.methods]
            method = self.methods[labels.index(trial.suggest_categorical("method", labels))]
        params: dict[str, Any] = {"method": method.label} if len(self.methods) > 1 else {}
        drawn: dict[tuple[int, str], str] = {}
        settings: dict[str, dict[str, str]] = {"train": {}, "schedule": {}}
        for name, (i, knob) in self.knobs(method).items():
            v = knob.value
            if isinstance(v, tuple):
                text = ",".join(v)
            else:
                if isinstance(v, Choice):
                    got = trial.suggest_categorical(name, list(v.texts))
                elif v.integer:
                    got = trial.suggest_int(name, int(v.low), int(v.high), log=v.log)
                else:
                    got = trial.suggest_float(name, v.low, v.high, log=v.log)
                params[name] = got
                text = got if isinstance(got, str) else v.text(got)
            group = method.groups[i].name if i >= 0 else name.split(".")[0]
            if group in GROUPS:
                settings[group][knob.key] = text
            drawn[(i, knob.key)] = text
        parts = [g.name + ("{" + ",".join(f"{k.key}={drawn[(i, k.key)]}" for k in g.knobs) + "}" if g.knobs else "")
                 for i, g in enumerate(method.groups) if g.name not in GROUPS]
        return Candidate(method.label, ",".join(parts) or None, settings["train"], settings["schedule"], params)

    # -- transport to the workers -----------------------------------------------------------------
    def to_json(self) -> dict:
        def knob(k: Knob) -> dict:
            v = k.value
            value = ({"choice": list(v.texts)} if isinstance(v, Choice) else {"fixed": list(v)} if isinstance(v, tuple)
                     else {"range": [v.low, v.high], "integer": v.integer, "log": v.log})
            return {"key": k.key, "position": k.position, **value}

        def group(g: Group) -> dict:
            return {"name": g.name, "knobs": [knob(k) for k in g.knobs]}

        return {"methods": [{"label": m.label, "groups": [group(g) for g in m.groups]} for m in self.methods],
                "shared": [group(g) for g in self.shared]}

    @classmethod
    def from_json(cls, data: dict) -> Space:
        def knob(d: dict) -> Knob:
            value = (Choice(tuple(d["choice"])) if "choice" in d else tuple(d["fixed"]) if "fixed" in d
                     else Range(*d["range"], integer=d["integer"], log=d["log"]))
            return Knob(d["key"], value, d["position"])

        def group(d: dict) -> Group:
            return Group(d["name"], tuple(knob(k) for k in d["knobs"]))

        return cls(tuple(Method(m["label"], tuple(group(g) for g in m["groups"])) for m in data["methods"]),
                   tuple(group(g) for g in data["shared"]))


# ------------------------------------------------------------------------------------------ parsing

def parse_space(text: str) -> Space:
    """Parse and check a search space (see the module docstring); errors point at the character."""
    if not text.strip():
        raise PipelineError("empty search space", hint="e.g. 'petra{stages=2..4};train{lr=1e-3..1e-1:log}'")
    methods: list[tuple[str, list[Group], PipelineItem]] = []
    shared: dict[str, Group] = {}
    for start, end in split_top_level(text, ";"):
        if not text[start:end].strip():
            raise PipelineError("empty alternative" + caret(text, min(start, len(text) - 1)),
                                hint="separate alternatives with a single ';'")
        items = parse_pipeline(text, "pass", start, end)
        groups, seen = [], set()
        for item in items:
            if item.name in GROUPS and item.name in seen:
                raise PipelineError(f"{item.name}{{}} given twice in one alternative"
                                    + caret(text, item.position, len(item.name)), hint="merge them into one group")
            seen.add(item.name)
            groups.append(_group(item, text))
        if all(g.name in GROUPS for g in groups):
            for g, item in zip(groups, items):
                if g.name in shared:
                    raise PipelineError(f"a shared {g.name}{{}} given twice"
                                        + caret(text, item.position, len(item.name)), hint="merge them into one group")
                shared[g.name] = g
        else:
            passes = [g for g in groups if g.name not in GROUPS]
            methods.append(("+".join(g.name for g in passes),
                            passes + [g for g in groups if g.name in GROUPS], items[0]))
    labels: dict[str, int] = {}
    out = []
    for label, groups, _ in methods:
        labels[label] = labels.get(label, 0) + 1
        out.append(Method(label if labels[label] == 1 else f"{label}#{labels[label]}", tuple(groups)))
    if not out:
        out = [Method("model", ())]
    space = Space(tuple(out), tuple(shared[g] for g in GROUPS if g in shared))
    _check_schedules(space, text)
    return space


def knob_types(group: str) -> dict[str, Any]:
    """The options a group takes, with their types."""
    if group == "train":
        from ..runtime.train import TrainConfig

        hints = typing.get_type_hints(TrainConfig)
        return {f.name: (str if f.name == "schedule" else hints[f.name]) for f in dataclasses.fields(TrainConfig)}
    if group == "schedule":
        from ..runtime.schedules import SCHEDULES

        out: dict[str, Any] = {}
        for cls in SCHEDULES.values():
            for k, tp in option_types(cls.Options).items():
                out.setdefault(k, tp)
        return out
    from ..passes import COMPOSITES, PASSES

    if group in COMPOSITES:
        return {k: option_types(PASSES[target].Options)[k] for k, target in COMPOSITES[group].routes.items()}
    if group in PASSES:
        return option_types(PASSES[group].Options)
    return {}


def _group(item: PipelineItem, text: str) -> Group:
    from ..passes import COMPOSITES, PASSES

    if item.name not in GROUPS and item.name not in PASSES and item.name not in COMPOSITES:
        raise PipelineError(f"unknown pass '{item.name}'" + caret(text, item.position, len(item.name)),
                            hint=did_you_mean(item.name, [*PASSES, *COMPOSITES, *GROUPS]))
    types = knob_types(item.name)
    what = {"train": "training option", "schedule": "schedule option"}.get(item.name, f"option of '{item.name}'")
    knobs = []
    for key, texts in item.options.items():
        at = item.option_positions[key]
        if item.name == "train" and key in NOT_SEARCHED:
            raise PipelineError(f"train{{{key}}} cannot be searched" + caret(text, at, len(key)),
                                hint=NOT_SEARCHED[key])
        if key not in types:
            message = {"train": f"train{{}} has no option '{key}'",
                       "schedule": f"no schedule has an option '{key}'"}.get(
                item.name, f"'{item.name}' has no option '{key}'")
            raise PipelineError(message + caret(text, at, len(key)),
                                hint=did_you_mean(key, [k for k in types if k not in NOT_SEARCHED])
                                if types else f"'{item.name}' takes no options")
        where = f"{what} '{key}'" if item.name in GROUPS else f"option '{key}' of '{item.name}'"
        positions = item.value_positions[key]
        if len(texts) > 1:  # a list option's further values: split{at=layer2,layer3}
            for t, pos in zip(texts, positions):
                if isinstance(parse_domain(text, pos, t, types[key], where), (Choice, Range)):
                    raise PipelineError(f"{where}: a list of values is fixed; search it as one choice"
                                        + caret(text, pos, len(t)), hint=f"{key}=a|b|c")
            knobs.append(Knob(key, tuple(texts), at))
            continue
        value = parse_domain(text, positions[0], texts[0], types[key], where)
        if item.name == "train" and key == "schedule":
            _check_schedule_texts(value, text, positions[0], where)
        else:
            _check_admissible(item.name, key, value, types[key], text, positions[0], where)
        knobs.append(Knob(key, (value,) if isinstance(value, str) else value, at))
    return Group(item.name, tuple(knobs))


def _check_admissible(group: str, key: str, value: Any, tp: Any, text: str, at: int, where: str) -> None:
    """Each value a knob can take (a fixed value, every choice, both ends of a range: ranges include
    their ends) passes the options' own checks, so that no trial fails on an option the space allows."""
    from ..passes import COMPOSITES, PASSES

    if isinstance(value, Range):
        dots = text.find("..", at)
        high = re.match(r"[^:,;}|]*", text[dots + 2:]).group().strip()
        values = [(text[at:dots].strip(), at), (high, dots + 2)]
    elif isinstance(value, Choice):
        values, pos = [], at
        for t in value.texts:
            pos = text.find(t, pos)
            values.append((t, pos))
    else:
        values = [(value, at)]
    for t, pos in values:
        try:
            if group == "train":
                from ..runtime.train import TrainConfig

                TrainConfig(**{key: convert(t, tp)}).validate()
            elif group == "schedule":
                from ..runtime.schedules import SCHEDULES

                for cls in SCHEDULES.values():
                    if key in option_types(cls.Options):
                        build_options(cls, {key: [t]}, what="schedule")
            else:
                target = COMPOSITES[group].routes[key] if group in COMPOSITES else group
                build_options(PASSES[target], {key: [t]})
        except (GradxformError, ValueError) as e:
            message = getattr(e, "message", str(e)).split(": ", 1)[-1].removeprefix("--")
            raise PipelineError(f"{where}: {message}" + caret(text, pos, len(t)), hint=getattr(e, "hint", None)) from None


def _check_schedule_texts(value: Any, text: str, at: int, where: str) -> None:
    """``train{schedule=...}``: each choice is schedule text that names a known schedule."""
    from ..runtime.schedules import make_schedule

    for spec in value.texts if isinstance(value, Choice) else [value]:
        if spec.strip() == "auto":
            continue
        try:
            make_schedule(spec)
        except PipelineError as e:
            pos = text.find(spec, at)
            raise PipelineError(f"{where}: {e.message.splitlines()[0]}" + caret(text, pos, len(spec)),
                                hint=e.hint) from None


def schedules_of(space: Space, method: Method) -> list[str]:
    """The schedules a method's trials may train with: the choices of ``train{schedule=...}``, or
    the one its pipeline compiles for (read with every knob at its first admissible value)."""
    from ..passes import compiled_schedule

    knob = next((k for g in (*method.groups, *space.shared) if g.name == "train" for k in g.knobs
                 if k.key == "schedule"), None)
    specs = ([] if knob is None else list(knob.value.texts) if isinstance(knob.value, Choice) else [knob.corner()])
    names = []
    for spec in specs or ["auto"]:
        if spec.strip() == "auto":
            pipeline = ",".join(g.name + ("{" + ",".join(f"{k.key}={k.corner()}" for k in g.knobs) + "}"
                                          if g.knobs else "") for g in method.passes)
            # as TrainConfig resolves auto: the compiled-for schedule, or one stage with backprop
            # (a model without passes is compiled with split{stages=1}, which names petra)
            spec = compiled_schedule(pipeline) or "backprop" if pipeline else "petra"
        names.append(parse_pipeline(spec, "schedule")[0].name)
    return names


def _check_schedules(space: Space, text: str) -> None:
    """Every schedule{} knob is an option of every schedule its method's trials may train with."""
    from ..runtime.schedules import SCHEDULES

    for method in space.methods:
        for group in (*[g for g in method.groups if g.name == "schedule"],
                      *[g for g in space.shared if g.name == "schedule"]):
            for name in schedules_of(space, method):
                if name not in SCHEDULES:
                    continue  # an unknown schedule name is reported when train{schedule} is checked
                known = option_types(SCHEDULES[name].Options)
                for k in group.knobs:
                    if k.key not in known:
                        at = k.position
                        raise PipelineError(
                            f"schedule{{{k.key}}}: method '{method.label}' trains with '{name}', which has no "
                            f"option '{k.key}'" + caret(text, at, len(k.key)),
                            hint=f"'{name}' takes: {', '.join(sorted(known)) or 'no options'}; give the method "
                                 f"its own schedule{{}} group, or another schedule with train{{schedule=...}}")
