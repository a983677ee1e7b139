"""User-facing errors.

Every failure a person running gradxform can cause (a bad file, a bad pipeline, a model the tracers
cannot read) is raised as a :class:`GradxformError`: a one-line statement of what went wrong, where,
and a hint of what to try. The CLI prints these without a traceback and exits non-zero; anything
else that escapes is a bug in gradxform and keeps its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class GradxformError(Exception):
    """An error caused by the input, with what went wrong, where, and what to try."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = self.message if not self.where else f"{self.where}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ModelLoadError(GradxformError):
    """The model file could not be found, imported, or holds no usable model."""


class TraceError(GradxformError):
    """Neither tracer could turn the model into a graph."""


class PipelineError(GradxformError):
    """The pass pipeline text or a pass option is malformed."""


class PassError(GradxformError):
    """A pass failed or broke the model; names the pass and the ones that ran before it."""


class ExportError(GradxformError):
    """Writing or reading an artefact failed."""


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, for 'did you mean' hints."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    best = nearest(word, choices)
    listing = ", ".join(choices)
    return (f"did you mean '{best}'? " if best else "") + f"known: {listing}"
