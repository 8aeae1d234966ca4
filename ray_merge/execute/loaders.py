"""Reading a plan's input tensors: lazily from disk, or kept resident (evolution re-merges the same inputs)."""
from __future__ import annotations

import os
import threading
from typing import Optional

import psutil
import torch

from ray_merge.io.hub import snapshot_commit
from ray_merge.io.models import (
    ModelRef,
    WeightReader,
    fetch_weights,
    index_weight_file,
    index_weights,
    read_config,
)
from ray_merge.io.quantized import quantization_format
from ray_merge.planner.plan import Plan, PlannedTensor, TensorInput


def input_files(plan: Plan, model: int) -> set[str]:
    """The weight files the plan reads of one of its models."""
    return {i.file for t in plan.tensors for i in t.inputs if i.model == model}


def reads_by_file(plan: Plan, model: int) -> bool:
    """Whether a model's weights are fetched file by file as they are read: a hub model planned from its
    metadata at a known commit, in unquantized safetensors files (the scales of a quantized tensor may be in
    another file: such a model, or one in PyTorch .bin files, is fetched whole when first read)."""
    m = plan.models[model]
    if os.path.isdir(ModelRef.parse(m.ref).path) or snapshot_commit(m.path) is None:
        return False
    if not all(f.endswith(".safetensors") for f in input_files(plan, model)):
        return False
    return quantization_format(read_config(m.path, m.ref), m.ref) is None


class TensorLoader:
    """Reads input tensors of a plan's models from disk, lazily. A hub model's weight file is downloaded
    (into this node's hub cache, at the planned commit) when the first tensor of that file is read, unless it
    is there already: a Ray worker fetches only the files of the shards it merges."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._readers: dict[int, WeightReader] = {}
        self._files: dict[int, set[str]] = {}  # models read file by file: the files indexed so far
        self._lock = threading.Lock()  # read-ahead threads open readers too
        self.drop_after_use = plan.bytes_read > psutil.virtual_memory().available

    def reader(self, model: int, file: Optional[str] = None) -> WeightReader:
        """The reader of a model's tensors; with ``file`` (a planned input file), one that holds that file's."""
        with self._lock:
            m = self.plan.models[model]
            r = self._readers.get(model)
            if r is None:
                if reads_by_file(self.plan, model):
                    r = WeightReader({})
                    self._files[model] = set()
                else:
                    r = WeightReader(index_weights(fetch_weights(m.ref, m.path, input_files(self.plan, model)),
                                                   m.ref))
                self._readers[model] = r
            files = self._files.get(model)
            if files is not None and file is not None:
                name = os.path.basename(file)
                if name not in files:
                    path = fetch_weights(m.ref, m.path, [name], each=True)
                    r.index.update(index_weight_file(os.path.join(path, name), m.ref))
                    files.add(name)
            return r

    def load(self, inp: TensorInput) -> torch.Tensor:
        return self.reader(inp.model, inp.file).read(inp.tensor)

    def load_all(self, pt: PlannedTensor) -> list[torch.Tensor]:
        return [self.load(i) for i in pt.inputs]

    def evict(self, pt: PlannedTensor) -> None:
        """Drop a merged tensor's inputs from the page cache when the inputs are larger than the free memory:
        read once, they would only push out pages that are still to be read, and the kernel's reclaim of a
        full cache costs the merge CPU time (out of core, linear: 1.2x faster with it)."""
        if not self.drop_after_use:
            return
        for inp in pt.inputs:
            meta = self.reader(inp.model, inp.file).index.get(inp.tensor)
            if meta is None or meta.offset is None or meta.quant is not None or not meta.nbytes:
                continue  # PyTorch .bin files, quantized tensors: read whole by their own loaders
            try:
                fd = os.open(meta.file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, meta.offset, meta.nbytes, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):  # only advice: a platform without it, a file gone (read fails later)
                pass

    def load_rows(self, inp: TensorInput, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an input tensor, reading only those (row-chunked merges, remapped vocabularies)."""
        return self.reader(inp.model, inp.file).read_rows(inp.tensor, start, stop)


class ResidentLoader(TensorLoader):
    """Keeps every tensor it has read in memory (evolution re-merges the same inputs).

    ``in_memory`` (model ref -> state dict): models that exist only in memory, such as an earlier stage of a
    multi-stage candidate planned with the planner's ``in_memory``; their tensors are taken from there, never
    from disk nor the cache."""

    def __init__(self, plan: Plan, in_memory: Optional[dict[str, dict[str, torch.Tensor]]] = None):
        super().__init__(plan)
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.in_memory = in_memory or {}

    def load(self, inp: TensorInput) -> torch.Tensor:
        given = self.in_memory.get(self.plan.models[inp.model].ref)
        if given is not None:
            return given[inp.tensor]
        key = (self.plan.models[inp.model].path, inp.tensor)
        t = self.cache.get(key)
        if t is None:
            t = super().load(inp).clone()
            self.cache[key] = t
        return t

    def load_rows(self, inp: TensorInput, start: int, stop: int) -> torch.Tensor:
        return self.load(inp)[start:stop]

    def evict(self, pt: PlannedTensor) -> None:
        pass  # tensors are read once, then kept (and in-memory models have no file)
