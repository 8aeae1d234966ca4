"""Memory: what a planned tensor needs to merge, when it is merged in row chunks, and default budgets.

Every budget decision of a merge is made here, before any tensor is read.
"""
from __future__ import annotations

from typing import Iterable, Optional

import psutil

from ray_merge.errors import UserError
from ray_merge.methods import get_method
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.planner.plan import Plan, PlannedTensor, Shard
from ray_merge.units import format_bytes

# Default budgets, when none is given: the one place they are computed.
RAM_FRACTION = 0.6  # of this machine's available RAM: merges in this process (shared by local workers)
NODE_MEMORY_FRACTION = 0.8  # of a Ray node's memory resource: shared by the workers placed on the node
GPU_MEMORY_FRACTION = 0.9  # of a GPU's memory: the budget of a GPU worker


def row_splittable(pt: PlannedTensor) -> bool:
    """Whether ``pt`` may be merged in row chunks with identical results."""
    if len(pt.shape) < 1 or pt.shape[0] < 2:
        return False
    if pt.packed is not None and pt.packed.dim == 0:  # its rows are blocks of different layers
        return False
    method = get_method(pt.method, internal=True)
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


def default_memory_budget(share: int = 1) -> int:
    """The budget of one of ``share`` merges running at once on this machine (a share of available RAM)."""
    return int(psutil.virtual_memory().available * RAM_FRACTION) // share


def memory_budget(given: Optional[int]) -> int:
    """The budget of work in this process: the one given, else the default."""
    return given or default_memory_budget()


def node_worker_budget(node_memory: float, workers_on_node: int) -> Optional[int]:
    """The budget of each of ``workers_on_node`` workers on a Ray node with ``node_memory`` bytes (None: unknown)."""
    return int(node_memory * NODE_MEMORY_FRACTION / workers_on_node) or None


def gpu_budget(gpu_memory: int) -> Optional[int]:
    """The budget of a worker on a GPU with ``gpu_memory`` bytes (None: unknown)."""
    return int(gpu_memory * GPU_MEMORY_FRACTION) or None


def planned_budgets(spec: WorkerSpec, options: MergeOptions, n: int) -> list[Optional[int]]:
    """Budgets known without a cluster: explicit ones, or this machine's memory shared by local workers."""
    if options.memory_budget:
        return [options.memory_budget] * n
    if spec.gpus:
        return [None] * n  # the GPU's memory, known when the workers start
    if spec.memory:
        return [spec.memory] * n
    return [None if spec.remote else default_memory_budget(n)] * n


# ---------------------------------------------------------------------------------------------
# The worker actor
# ---------------------------------------------------------------------------------------------
