"""Streaming planned tensors: merged whole, inputs read one tensor ahead on a background thread, or in
row chunks, reading only those rows.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import torch

from ray_merge.execute.compute import compute_tensor
from ray_merge.execute.loaders import TensorLoader
from ray_merge.execute.rows import tensor_rows
from ray_merge.planner.memory import rows_per_chunk
from ray_merge.planner.plan import Plan, PlannedTensor


def row_groups(tensors: list[PlannedTensor], memory_budget: Optional[int]):
    """Split tensors into runs merged whole (rows None), and single tensors merged in row chunks."""
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


def iter_computed(plan: Plan, tensors: list[PlannedTensor], loader: TensorLoader, *,
                  seed: Optional[int], device: str = "cpu", memory_budget: Optional[int] = None):
    """Yield (planned tensor, merged tensor), reading the next inputs ahead when the budget allows."""
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-read") as pool:
        pending: Optional[Future] = None
        merged: Optional[PlannedTensor] = None  # the tensor merged before this one
        for i, pt in enumerate(tensors):
            inputs = pending.result() if pending is not None else tensor_rows(pt, loader).whole(memory_budget)
            pending = None
            if i + 1 < len(tensors):
                nxt = tensors[i + 1]
                # remapped vocabularies are assembled within the whole budget: never read ahead
                if nxt.row_remap is None and (memory_budget is None
                                              or pt.working_bytes + nxt.in_bytes <= memory_budget):
                    pending = pool.submit(loader.load_all, nxt)
            out = compute_tensor(pt, inputs, seed, device)
            del inputs
            # out of core, inputs' pages are not needed again; drop the previous tensor's, not this one's:
            # the kernel keeps pages that were unmapped a moment ago (measured with mincore)
            if merged is not None:
                loader.evict(merged)
            merged = pt
            yield pt, out
            del out  # the caller owns it now: don't hold it while the next tensor is computed
        if pending is not None:
            pending.result()
        if merged is not None:
            loader.evict(merged)


def iter_row_chunks(pt: PlannedTensor, loader: TensorLoader, rows: int, *, seed: Optional[int],
                    device: str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, merged rows) of ``pt`` in chunks of ``rows`` rows, reading only those input rows."""
    for start, inputs in tensor_rows(pt, loader).chunks(rows):
        out = compute_tensor(pt, inputs, seed, device)
        del inputs
        yield start, out
        del out
    loader.evict(pt)


def merge_in_memory(plan: Plan, loader: Optional[TensorLoader] = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every output tensor of the plan, as a state dict (no files written)."""
    loader = loader or TensorLoader(plan)
    out: dict[str, torch.Tensor] = {}
    for group, rows in row_groups(plan.tensors, None):
        if rows is None:
            out.update((pt.name, t) for pt, t in iter_computed(plan, group, loader, seed=plan.seed, device=device))
            continue
        pt = group[0]
        whole = None
        for start, chunk in iter_row_chunks(pt, loader, rows, seed=plan.seed, device=device):
            if whole is None:
                whole = torch.empty(pt.shape, dtype=chunk.dtype)
            whole[start:start + chunk.shape[0]] = chunk
        out[pt.name] = whole
    return out
