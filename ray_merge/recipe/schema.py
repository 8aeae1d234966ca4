"""What a recipe is once loaded: output slices of source models with their parameters.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import yaml

from ray_merge.io.models import ModelRef

DTYPES = ("float32", "float16", "bfloat16", "float64")


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                 "float": "float32", "fp64": "float64", "double": "float64"}


TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "modules",
}


@dataclass
class SliceSource:
    model: ModelRef
    layer_range: Optional[tuple[int, int]]  # None: every layer (from `models:`)
    parameters: dict = field(default_factory=dict)


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    base_model: Optional[ModelRef] = None
    parameters: dict = field(default_factory=dict)


@dataclass
class OutputModule:
    """One module of a ``modules:`` recipe (a text decoder, a vision tower ...): its own slices or models."""

    slices: list[OutputSlice]
    from_models: bool  # written with `models:` (one slice spanning every layer of the module)
    parameters: dict = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    slices: list[OutputSlice]  # empty in a `modules:` recipe
    from_models: bool  # written with `models:` (one slice spanning every layer)
    base_model: Optional[ModelRef] = None
    parameters: dict = field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[dict] = None
    chat_template: Optional[str] = None
    source: str = "<recipe>"
    raw: dict = field(default_factory=dict)
    modules: dict[str, OutputModule] = field(default_factory=dict)  # `modules:` recipes (then no slices)

    def referenced_models(self) -> list[ModelRef]:
        """Every model the recipe names, in first-mention order, base first."""
        seen: dict[ModelRef, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for s in self.slices + [s for m in self.modules.values() for s in m.slices]:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()
