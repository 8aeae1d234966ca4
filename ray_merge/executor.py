"""The streaming executor: computes planned tensors and writes output shards.

The unit of work is a list of output shards; the in-process engine runs all of
them, a Ray worker runs the ones the driver assigns to it. Inputs for the next
tensor are read in a background thread while the current one is computed, and the
finished tensor is written in another, as far as the memory budget allows.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from ray_merge.io.models import WeightReader, index_weights
from ray_merge.io.writer import ShardWriter
from ray_merge.methods import MergeInputs, get_method
from ray_merge.plan import Plan, PlannedTensor, Shard, TensorInput


def tensor_seed(seed: Optional[int], name: str) -> int:
    """A per-tensor seed, so random methods never depend on order or partitioning."""
    digest = hashlib.sha256(f"{seed or 0}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


def compute_tensor(pt: PlannedTensor, inputs: list[torch.Tensor], seed: Optional[int],
                   device: str = "cpu") -> torch.Tensor:
    """Merge one output tensor from its (already read) inputs."""
    if pt.method == "passthrough_buffer":  # integer buffers are copied, not merged
        return inputs[0].clone()
    method = get_method(pt.method)
    dtype = getattr(torch, pt.compute_dtype) if pt.compute_dtype else None
    tensors = [t.to(device=device, dtype=dtype or t.dtype) for t in inputs]
    generator = None
    if method.randomized:
        generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, pt.name))
    out = method.merge(
        MergeInputs(
            tensors=tensors,
            base_index=pt.base_index,
            model_params=pt.model_params,
            params=pt.params,
            generator=generator,
            name=pt.name,
        )
    )
    return out.to(device="cpu", dtype=getattr(torch, pt.out_dtype))


@dataclass
class ShardResult:
    index: int
    filename: str
    sha256: str
    nbytes: int
    tensors: list[str]


def iter_computed(plan: Plan, tensors: list[PlannedTensor], loader: TensorLoader, *,
                  seed: Optional[int], device: str = "cpu", memory_budget: Optional[int] = None):
    """Yield (planned tensor, merged tensor), reading the next inputs ahead when the budget allows."""
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-read") as pool:
        pending: Optional[Future] = None
        for i, pt in enumerate(tensors):
            inputs = pending.result() if pending is not None else loader.load_all(pt)
            pending = None
            if i + 1 < len(tensors):
                nxt = tensors[i + 1]
                if memory_budget is None or pt.working_bytes + nxt.in_bytes <= memory_budget:
                    pending = pool.submit(loader.load_all, nxt)
            out = compute_tensor(pt, inputs, seed, device)
            del inputs
            yield pt, out
        if pending is not None:
            pending.result()


def write_shards(plan: Plan, shards: Iterable[Shard], out_dir: str, *, loader: Optional[TensorLoader] = None,
                 device: str = "cpu", memory_budget: Optional[int] = None,
                 on_tensor: Optional[Callable[[PlannedTensor], None]] = None,
                 on_shard: Optional[Callable[[ShardResult], None]] = None) -> list[ShardResult]:
    """Compute and write the given output shards into ``out_dir``; return their checksums."""
    loader = loader or TensorLoader(plan)
    results = []
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-write") as write_pool:
        for shard in shards:
            tensors = plan.shard_tensors(shard)
            writer = ShardWriter(os.path.join(out_dir, shard.filename),
                                 [(t.name, t.shape, t.out_dtype) for t in tensors])
            try:
                pending: Optional[Future] = None
                for pt, out in iter_computed(plan, tensors, loader, seed=plan.seed, device=device,
                                             memory_budget=memory_budget):
                    if pending is not None:
                        pending.result()
                    pending = write_pool.submit(writer.write, pt.name, out)
                    if on_tensor:
                        on_tensor(pt)
                    del out
                if pending is not None:
                    pending.result()
                digest = writer.close()
            except BaseException:
                writer.abort()
                raise
            res = ShardResult(shard.index, shard.filename, digest, writer.total_bytes, list(shard.tensors))
            results.append(res)
            if on_shard:
                on_shard(res)
    return results


def merge_in_memory(plan: Plan, loader: Optional[TensorLoader] = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every output tensor of the plan, as a state dict (no files written)."""
    loader = loader or TensorLoader(plan)
    return {pt.name: out for pt, out in iter_computed(plan, plan.tensors, loader, seed=plan.seed, device=device)}
