"""Importing this module registers gradxform's built-in passes and composites."""

from . import reversible, split  # noqa: F401
