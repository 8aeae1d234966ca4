"""Reading a plan's input tensors: lazily from disk, or kept resident (evolution re-merges the same inputs)."""
from __future__ import annotations

import torch

from ray_merge.io.models import WeightReader, index_weights
from ray_merge.planner.plan import Plan, PlannedTensor, TensorInput


class TensorLoader:
    """Reads input tensors of a plan's models from disk, lazily."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._readers: dict[int, WeightReader] = {}

    def reader(self, model: int) -> WeightReader:
        r = self._readers.get(model)
        if r is None:
            m = self.plan.models[model]
            r = WeightReader(index_weights(m.path, m.ref))
            self._readers[model] = r
        return r

    def load(self, inp: TensorInput) -> torch.Tensor:
        return self.reader(inp.model).read(inp.tensor)

    def load_all(self, pt: PlannedTensor) -> list[torch.Tensor]:
        return [self.load(i) for i in pt.inputs]

    def load_rows(self, inp: TensorInput, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an input tensor, reading only those (row-chunked merges, remapped vocabularies)."""
        return self.reader(inp.model).read_rows(inp.tensor, start, stop)


class ResidentLoader(TensorLoader):
    """Keeps every tensor it has read in memory (evolution re-merges the same inputs)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    def load(self, inp: TensorInput) -> torch.Tensor:
        key = (self.plan.models[inp.model].path, inp.tensor)
        t = self.cache.get(key)
        if t is None:
            t = super().load(inp).clone()
            self.cache[key] = t
        return t

    def load_rows(self, inp: TensorInput, start: int, stop: int) -> torch.Tensor:
        return self.load(inp)[start:stop]
