"""Importing this module registers gradxform's built-in passes and composites."""

from . import split  # noqa: F401
