"""Third-party modules the method bodies use (torch, numpy), imported on first use.

Importing ``ray_merge.methods`` registers every method with its declared parameters; only merging needs
torch. Declarations and bodies stay together in one module per family, and listing the methods
(``ray-merge methods``) or checking a recipe never pays torch's import (~1.4 s).
"""
from __future__ import annotations

import importlib
import types


class _Deferred(types.ModuleType):
    """Stands for a module until an attribute is read: then imports it and keeps each attribute read."""

    def __getattr__(self, attr: str):  # only called for attributes not yet kept
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def deferred(name: str) -> types.ModuleType:
    """A stand-in for module ``name`` (``torch = deferred("torch")``), imported when first used."""
    return _Deferred(name)
