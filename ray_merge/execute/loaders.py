"""Reading a plan's input tensors: lazily from disk, or kept resident (evolution re-merges the same inputs)."""
from __future__ import annotations

import torch

from ray_merge.io.models import WeightReader, fetch_weights, index_weights
from ray_merge.planner.plan import Plan, PlannedTensor, TensorInput


def input_files(plan: Plan, model: int) -> set[str]:
    """The weight files the plan reads of one of its models."""
    return {i.file for t in plan.tensors for i in t.inputs if i.model == model}


def fetch_inputs(plan: Plan) -> None:
    """Download the weights of the plan's hub models (planning read only their metadata); local
    models and hub models already in the cache are left as they are."""
    for k, m in enumerate(plan.models):
        fetch_weights(m.ref, m.path, input_files(plan, k))


class TensorLoader:
    """Reads input tensors of a plan's models from disk, lazily; a hub model's weights are downloaded
    when its first tensor is read, unless they are there already."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._readers: dict[int, WeightReader] = {}

    def reader(self, model: int) -> WeightReader:
        r = self._readers.get(model)
        if r is None:
            m = self.plan.models[model]
            path = fetch_weights(m.ref, m.path, input_files(self.plan, model))
            r = WeightReader(index_weights(path, m.ref))
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
