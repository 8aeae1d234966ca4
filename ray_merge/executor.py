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

    def load_rows(self, inp: TensorInput, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an input tensor (row-chunked merges of tensors over the memory budget)."""
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


# Element-wise methods run over blocks of about this many elements: the working set stays in
# the CPU cache, and torch spreads each op over the cores (a thread per block instead nests
# OpenMP teams, which measured 10-20% slower on 2 cores).
BLOCK_ELEMENTS = 1 << 17


def compute_tensor(pt: PlannedTensor, inputs: list[torch.Tensor], seed: Optional[int],
                   device: str = "cpu") -> torch.Tensor:
    """Merge one output tensor from its (already read) inputs."""
    if pt.method == "passthrough_buffer":  # integer buffers are copied, not merged
        return inputs[0].clone()
    method = get_method(pt.method)
    dtype = getattr(torch, pt.compute_dtype) if pt.compute_dtype else None
    out_dtype = getattr(torch, pt.out_dtype)
    generator = None
    if method.randomized:
        generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, pt.name))

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        tensors = [t.to(device=device, dtype=dtype or t.dtype) for t in tensors]
        return method.merge(MergeInputs(tensors=tensors, base_index=pt.base_index, model_params=pt.model_params,
                                        params=pt.params, generator=generator, name=pt.name))

    numel = inputs[0].numel()
    if (device == "cpu" and method.row_splittable and not method.randomized and inputs[0].dim() >= 1
            and numel >= 4 * BLOCK_ELEMENTS):
        # identical to merging the whole tensor: row-splittable methods are element-wise per row
        rows = inputs[0].shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, numel // rows))
        out = torch.empty(inputs[0].shape, dtype=out_dtype)

        def block(start: int) -> None:
            out[start:start + step] = merge([t[start:start + step] for t in inputs]).to(out_dtype)

        for start in range(0, rows, step):
            block(start)
        return out
    return merge(inputs).to(device="cpu", dtype=out_dtype)


@dataclass
class ShardResult:
    index: int
    filename: str
    checksum: str  # xxh3-128 of the file, hex
    nbytes: int
    tensors: list[str]


def iter_computed(plan: Plan, tensors: list[PlannedTensor], loader: TensorLoader, *,
                  seed: Optional[int], device: str = "cpu", memory_budget: Optional[int] = None):
    """Yield (planned tensor, merged tensor), reading the next inputs ahead when the budget allows."""
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-read") as pool:
        pending: Optional[Future] = None
        for i, pt in enumerate(tensors):
            if pt.row_remap is not None:  # a vocabulary tensor: its rows remapped to the output vocabulary
                from ray_merge.vocab import RemappedRows

                yield pt, RemappedRows(pt, loader, seed=seed, device=device, memory_budget=memory_budget).materialize()
                continue
            inputs = pending.result() if pending is not None else loader.load_all(pt)
            pending = None
            if i + 1 < len(tensors):
                nxt = tensors[i + 1]
                if nxt.row_remap is None and (memory_budget is None or pt.working_bytes + nxt.in_bytes <= memory_budget):
                    pending = pool.submit(loader.load_all, nxt)
            out = compute_tensor(pt, inputs, seed, device)
            del inputs
            yield pt, out
            del out  # the caller owns it now: don't hold it while the next tensor is computed
        if pending is not None:
            pending.result()


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def row_splittable(pt: PlannedTensor) -> bool:
    """Whether ``pt`` may be merged in row chunks with identical results."""
    if len(pt.shape) < 1 or pt.shape[0] < 2:
        return False
    if pt.method == "passthrough_buffer":
        return True
    method = get_method(pt.method)
    # randomised methods draw per tensor: chunks would draw different numbers
    return method.row_splittable and not method.randomized


def row_bytes(pt: PlannedTensor) -> int:
    """Working set of one output row (inputs, temporaries and output), rounded up."""
    return -(-pt.working_bytes // max(1, pt.shape[0] if pt.shape else 1))


def rows_per_chunk(pt: PlannedTensor, memory_budget: Optional[int]) -> Optional[int]:
    """Rows per chunk when ``pt`` must be merged in row chunks to fit the budget; None: whole tensor."""
    if pt.row_remap is not None:  # vocabulary tensors: streamed unless the method needs them whole
        return pt.row_remap.rows_per_chunk(memory_budget) if pt.row_remap.chunked else None
    if memory_budget is None or pt.working_bytes <= memory_budget or not row_splittable(pt):
        return None
    return max(1, memory_budget // row_bytes(pt))


def min_memory(pt: PlannedTensor) -> int:
    """The least memory ``pt`` can be merged in: one row when row-splittable, else the whole tensor."""
    return row_bytes(pt) if row_splittable(pt) else pt.working_bytes


def check_memory(plan: Plan, shards: Iterable[Shard], memory_budget: int) -> None:
    """Fail before any work when a tensor cannot be merged within ``memory_budget``."""
    from ray_merge.errors import UserError

    for s in shards:
        for pt in plan.shard_tensors(s):
            if pt.working_bytes <= memory_budget:
                continue
            if row_splittable(pt):
                if row_bytes(pt) > memory_budget:
                    raise UserError(
                        f"tensor {pt.name}: one row needs {format_bytes(row_bytes(pt))} to merge, more than the "
                        f"memory budget of {format_bytes(memory_budget)}"
                    )
                continue
            raise UserError(
                f"tensor {pt.name} needs {format_bytes(pt.working_bytes)} to merge with {pt.method} (which "
                f"needs the whole tensor at once), more than the memory budget of {format_bytes(memory_budget)}"
            )


def iter_row_chunks(pt: PlannedTensor, loader: TensorLoader, rows: int, *, seed: Optional[int],
                    device: str = "cpu"):
    """Yield the merged tensor ``pt`` in chunks of ``rows`` rows, reading only those input rows."""
    if pt.row_remap is not None:  # rows remapped to the output vocabulary (ray_merge.vocab)
        from ray_merge.vocab import RemappedRows

        for _, out in RemappedRows(pt, loader, seed=seed, device=device, rows=rows).chunks():
            yield out
        return
    for start in range(0, pt.shape[0], rows):
        stop = min(start + rows, pt.shape[0])
        inputs = [loader.load_rows(i, start, stop) for i in pt.inputs]
        out = compute_tensor(pt, inputs, seed, device)
        del inputs
        yield out
        del out


def _row_groups(tensors: list[PlannedTensor], memory_budget: Optional[int]):
    """Split a shard's tensors into runs merged whole, and single tensors merged in row chunks."""
    run: list[PlannedTensor] = []
    for pt in tensors:
        rows = rows_per_chunk(pt, memory_budget)
        if rows is None:
            run.append(pt)
            continue
        if run:
            yield run, None
            run = []
        yield [pt], rows
    if run:
        yield run, None


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
                for group, rows in _row_groups(tensors, memory_budget):
                    if rows is not None:  # over the budget: merged and written a few rows at a time
                        if pending is not None:
                            pending.result()
                            pending = None
                        pt = group[0]
                        for chunk in iter_row_chunks(pt, loader, rows, seed=plan.seed, device=device):
                            writer.write_rows(pt.name, chunk)
                            del chunk
                        if on_tensor:
                            on_tensor(pt)
                        continue
                    for k, (pt, out) in enumerate(iter_computed(plan, group, loader, seed=plan.seed, device=device,
                                                                memory_budget=memory_budget)):
                        if pending is not None:
                            pending.result()
                        pending = write_pool.submit(writer.write, pt.name, out)
                        if memory_budget is not None and k + 1 < len(group):
                            ahead = group[k + 1].working_bytes + (group[k + 2].in_bytes if k + 2 < len(group) else 0)
                            if pt.out_bytes + ahead > memory_budget:  # no room to write while the next is merged
                                pending.result()
                                pending = None
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
