"""Output shards over workers: what each shard costs, and an assignment that balances them under each
worker's memory budget (largest first).
"""
from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass, field
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.planner.memory import min_memory, row_bytes, rows_per_chunk
from ray_merge.planner.plan import Plan, PlannedTensor, Shard
from ray_merge.units import format_bytes


def tensor_peak(pt: PlannedTensor, budget: Optional[int]) -> int:
    """Memory ``pt`` takes on a worker with ``budget``: whole, or one row chunk."""
    rows = rows_per_chunk(pt, budget)
    if rows is None:
        return pt.working_bytes

    return rows * row_bytes(pt)


def shard_cost(plan: Plan, shard: Shard) -> int:
    """Work in a shard, as bytes read plus bytes written."""
    return sum(pt.in_bytes for pt in plan.shard_tensors(shard)) + shard.nbytes


def shard_need(plan: Plan, shard: Shard) -> int:
    """The smallest budget a worker needs for this shard (tensors split into rows where allowed)."""
    return max((min_memory(pt) for pt in plan.shard_tensors(shard)), default=0)


@dataclass
class WorkerLoad:
    worker: int
    budget: Optional[int]
    shards: list = field(default_factory=list)  # shard indices, in the order the worker does them
    bytes_read: int = 0
    bytes_written: int = 0
    peak_bytes: int = 0
    chunked_tensors: int = 0

    @property
    def cost(self) -> int:
        return self.bytes_read + self.bytes_written


def assign_shards(plan: Plan, shards: list[Shard], budgets: list[Optional[int]]) -> list[WorkerLoad]:
    """Give each shard, largest first, to the least-loaded worker whose budget fits it.

    ``budgets``: one per worker (None: unlimited). Deterministic. Each worker's shards
    are then done in index order.
    """
    loads = [WorkerLoad(i, b) for i, b in enumerate(budgets)]
    for s in sorted(shards, key=lambda s: (-shard_cost(plan, s), s.index)):
        need = shard_need(plan, s)
        fits = [w for w in loads if w.budget is None or w.budget >= need]
        if not fits:
            pt = max(plan.shard_tensors(s), key=min_memory)
            biggest = max(b for b in budgets if b is not None)
            raise UserError(f"tensor {pt.name} needs {format_bytes(min_memory(pt))} to merge, more than the largest "
                            f"worker memory budget ({format_bytes(biggest)})")
        w = min(fits, key=lambda w: (w.cost, w.worker))
        w.shards.append(s.index)
        tensors = plan.shard_tensors(s)
        w.bytes_read += sum(pt.in_bytes for pt in tensors)
        w.bytes_written += s.nbytes
        w.peak_bytes = max([w.peak_bytes] + [tensor_peak(pt, w.budget) for pt in tensors])
        w.chunked_tensors += sum(1 for pt in tensors if rows_per_chunk(pt, w.budget) is not None)
    for w in loads:
        w.shards.sort()
    return loads


class ShardQueue:
    """Which shard each worker does next, as the merge goes: the shards of a worker that died first (the
    first of them within the worker's budget), then the worker's own shards from :func:`assign_shards`,
    then, once those are done, a shard taken from the end of the longest other queue (by cost) that fits
    its budget.

    ``budgets``: worker id -> memory budget (None: unlimited), for the workers that take part.
    """

    def __init__(self, plan: Plan, shards: list[Shard], budgets: dict[int, Optional[int]]):
        workers = list(budgets)
        loads = assign_shards(plan, shards, [budgets[w] for w in workers])
        self.budgets = dict(budgets)
        self.queues = {w: collections.deque(load.shards) for w, load in zip(workers, loads)}
        self.orphans: collections.deque = collections.deque()
        self.need = {s.index: shard_need(plan, s) for s in shards}
        self.cost = {s.index: shard_cost(plan, s) for s in shards}

    def fits(self, worker: int, index: int) -> bool:
        budget = self.budgets[worker]
        return budget is None or budget >= self.need[index]

    def next_for(self, worker: int) -> Optional[int]:
        """The shard ``worker`` should do now (removed from the queues); None: none it can take."""
        for i, index in enumerate(self.orphans):
            if self.fits(worker, index):
                del self.orphans[i]
                return index
        own = self.queues[worker]
        if own:
            return own.popleft()
        others = sorted((w for w, q in self.queues.items() if w != worker and q),
                        key=lambda w: -sum(self.cost[i] for i in self.queues[w]))
        for w in others:
            q = self.queues[w]
            for j in range(len(q) - 1, -1, -1):
                if self.fits(worker, q[j]):
                    index = q[j]
                    del q[j]
                    return index
        return None

    def requeue(self, index: int) -> None:
        """A shard to redo (its worker died while on it): it goes before every other."""
        self.orphans.appendleft(index)

    def orphan(self, worker: int) -> list[int]:
        """``worker`` is gone: its queued shards go to the others. Returns them."""
        q = self.queues.get(worker)
        shards = list(q or [])
        self.orphans.extend(shards)
        if q:
            q.clear()
        return shards

    def pending(self) -> list[int]:
        """Shards not handed out yet."""
        return sorted([*self.orphans, *(i for q in self.queues.values() for i in q)])


def format_assignment(plan: Plan, loads: list[WorkerLoad], shards: Optional[list[Shard]] = None) -> str:
    shards = plan.shards if shards is None else shards
    lines = [f"workers:       {len(loads)}"]
    for w in loads:
        budget = format_bytes(w.budget) if w.budget is not None else "GPU memory"
        lines.append(
            f"  worker {w.worker}: {len(w.shards)} shard(s), writes {format_bytes(w.bytes_written)}, "
            f"reads {format_bytes(w.bytes_read)}, peak memory {format_bytes(w.peak_bytes)} "
            f"(budget {budget})" + (f", {w.chunked_tensors} tensor(s) in row chunks" if w.chunked_tensors else "")
        )
        if w.shards:
            lines.append(f"    shards {_ranges(w.shards)}")
    plan_bytes = len(pickle.dumps(plan))
    lines.append(f"through the driver: the plan ({format_bytes(plan_bytes)} to each worker) and checksums; "
                 f"no tensor data")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Estimated wall time per worker, from measured throughputs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    """Rates one merge method reached on one machine (``scripts/bench_merge.py`` writes them to bench.json)."""

    method: str
    read_bytes_per_s: float  # reading inputs
    write_bytes_per_s: float  # writing output shards
    compute_s_per_byte: float  # merging, in seconds per output byte


def estimate_seconds(load: WorkerLoad, rate: Throughput) -> float:
    """A worker's estimated wall time: its reads, its merging and its writes, one after the other.

    ``bytes read / read throughput + compute seconds per output byte x bytes written + bytes written / write
    throughput``. The model: every worker runs on its own node, all in parallel, each as fast as the machine
    the rates were measured on (no shared disk or network limit); reads overlapping compute (read-ahead) and
    Ray's start-up are not counted. The merge's wall time is that of the slowest worker.
    """
    return (load.bytes_read / rate.read_bytes_per_s + rate.compute_s_per_byte * load.bytes_written
            + load.bytes_written / rate.write_bytes_per_s)


def format_estimate(loads: list[WorkerLoad], rate: Optional[Throughput] = None) -> str:
    """Per worker: shards, bytes read and written, peak memory and (with ``rate``) the estimated wall time.
    Sizes in GB (1e9 bytes), or MB / kB for small merges."""
    largest = max([w.bytes_read for w in loads] + [w.peak_bytes for w in loads], default=0)
    unit, scale = "B", 1
    for u, n in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if largest >= n:
            unit, scale = u, n
    head = f"  {'worker':>6} {'shards':>6} {'read ' + unit:>9} {'written ' + unit:>10} {'peak ' + unit:>8}"
    if rate is None:
        lines = ["per worker (no time without --throughput-from):", head]
    else:
        title = (f"per worker, {rate.method} at {rate.read_bytes_per_s / 1e9:.3g} GB/s read, "
                 f"{rate.compute_s_per_byte * 1e9:.3g} s of compute per GB written, "
                 f"{rate.write_bytes_per_s / 1e9:.3g} GB/s write:")
        lines = [title, head + f" {'est. time':>10}"]
    for w in loads:
        line = (f"  {w.worker:>6} {len(w.shards):>6} {w.bytes_read / scale:>9.2f} {w.bytes_written / scale:>10.2f} "
                f"{w.peak_bytes / scale:>8.2f}")
        if rate is not None:
            line += f" {estimate_seconds(w, rate):>8.1f} s"
        lines.append(line)
    lines.append(f"  {'total':>6} {sum(len(w.shards) for w in loads):>6} "
                 f"{sum(w.bytes_read for w in loads) / scale:>9.2f} "
                 f"{sum(w.bytes_written for w in loads) / scale:>10.2f} "
                 f"{max((w.peak_bytes for w in loads), default=0) / scale:>8.2f}")
    if rate is not None:
        slowest = max((estimate_seconds(w, rate) for w in loads), default=0.0)
        lines.append(f"estimated wall time: {slowest:.1f} s ({slowest / 60:.1f} min), the slowest worker's "
                     f"(workers on separate nodes, in parallel; Ray start-up not counted)")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8' (shard indices)."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)
