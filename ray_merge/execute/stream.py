"""Streaming planned tensors: inputs read one tensor ahead on a background thread, or rows a chunk at a time."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from ray_merge.execute.compute import compute_tensor
from ray_merge.execute.loaders import TensorLoader
from ray_merge.execute.rows import RemappedRows
from ray_merge.planner.plan import Plan, PlannedTensor


def iter_computed(plan: Plan, tensors: list[PlannedTensor], loader: TensorLoader, *,
                  seed: Optional[int], device: str = "cpu", memory_budget: Optional[int] = None):
    """Yield (planned tensor, merged tensor), reading the next inputs ahead when the budget allows."""
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-read") as pool:
        pending: Optional[Future] = None
        for i, pt in enumerate(tensors):
            if pt.row_remap is not None:  # a vocabulary tensor: its rows remapped to the output vocabulary
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


def iter_row_chunks(pt: PlannedTensor, loader: TensorLoader, rows: int, *, seed: Optional[int],
                    device: str = "cpu"):
    """Yield the merged tensor ``pt`` in chunks of ``rows`` rows, reading only those input rows."""
    if pt.row_remap is not None:  # rows remapped to the output vocabulary (ray_merge.vocab)
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


def merge_in_memory(plan: Plan, loader: Optional[TensorLoader] = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every output tensor of the plan, as a state dict (no files written)."""
    loader = loader or TensorLoader(plan)
    return {pt.name: out for pt, out in iter_computed(plan, plan.tensors, loader, seed=plan.seed, device=device)}
