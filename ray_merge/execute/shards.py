"""Writing output shards: each shard's tensors computed in order (or in row chunks when over the budget)
and streamed into its safetensors file, checksummed.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from ray_merge.execute.loaders import TensorLoader
from ray_merge.execute.stream import iter_computed, iter_row_chunks, row_groups
from ray_merge.io.storage import filesystem, is_url
from ray_merge.io.writer import ShardWriter
from ray_merge.parallel import intra_op_threads, memory_bound_threads
from ray_merge.planner.plan import Plan, PlannedTensor, Shard

log = logging.getLogger("ray_merge")

# Ray workers write each shard under <staging>/ATTEMPTS_DIR, then rename it into place.
ATTEMPTS_DIR = ".ray-merge-attempts"

@dataclass
class ShardResult:
    index: int
    filename: str
    checksum: str  # xxh3-128 of the file, hex
    nbytes: int
    tensors: list[str]
    non_finite: dict[str, int] = field(default_factory=dict)  # tensor -> NaN/inf values in the merged output


def count_non_finite(t: torch.Tensor) -> int:
    """NaN and infinite values in ``t`` (0 for integer tensors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    with intra_op_threads(memory_bound_threads()):  # a memory-bound scan, beside the reader and writer threads
        return _count_non_finite(t)


def _count_non_finite(t: torch.Tensor) -> int:
    if t.element_size() == 1:  # float8: no aminmax or isfinite on CPU; float16 holds every value exactly
        t = t.to(torch.float16)
    # one reduction screens the tensor: min and max propagate NaN and are infinite for any inf (20x faster
    # than a float32 sum of bf16 values)
    if bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        return 0
    return t.numel() - int(torch.isfinite(t).sum())


def _report_non_finite(pt: PlannedTensor, count: int, plan: Plan, loader: Optional[TensorLoader]) -> None:
    """Warn about a merged tensor holding NaN/inf, naming the inputs that hold them (read again: rare)."""
    sources = []
    if loader is not None:
        for inp in pt.inputs:
            bad = count_non_finite(loader.load(inp))
            if bad:
                sources.append(f"{plan.models[inp.model].ref} ({bad})")
    where = f"; the inputs hold them too: {', '.join(sources)}" if sources else ""
    log.warning("tensor %s: %d NaN/inf value(s) in the merged output%s", pt.name, count, where)


def write_shards(plan: Plan, shards: Iterable[Shard], out_dir: str, *, loader: Optional[TensorLoader] = None,
                 device: str = "cpu", memory_budget: Optional[int] = None,
                 on_tensor: Optional[Callable[[PlannedTensor], None]] = None,
                 on_shard: Optional[Callable[[ShardResult], None]] = None,
                 storage_options: Optional[dict] = None) -> list[ShardResult]:
    """Compute and write the given output shards into ``out_dir`` (a local directory, or an fsspec URL opened
    with ``storage_options``: each shard streamed straight to its object); return their checksums."""
    loader = loader or TensorLoader(plan)
    results = []
    fs = None
    if is_url(out_dir):
        fs, out_dir = filesystem(out_dir, storage_options)
    with ThreadPoolExecutor(1, thread_name_prefix="ray-merge-write") as write_pool:
        for shard in shards:
            tensors = plan.shard_tensors(shard)
            path = os.path.join(out_dir, shard.filename) if fs is None else f"{out_dir}/{shard.filename}"
            writer = ShardWriter(path, [(t.name, t.shape, t.out_dtype) for t in tensors], fs=fs)
            try:
                pending: Optional[Future] = None
                non_finite: dict[str, int] = {}
                for group, rows in row_groups(tensors, memory_budget):
                    if rows is not None:  # over the budget: merged and written a few rows at a time
                        if pending is not None:
                            pending.result()
                            pending = None
                        pt = group[0]
                        bad = 0
                        for _, chunk in iter_row_chunks(pt, loader, rows, seed=plan.seed, device=device):
                            writer.write_rows(pt.name, chunk)
                            bad += count_non_finite(chunk)
                            del chunk
                        if bad:  # inputs over the budget are not read again to name them
                            non_finite[pt.name] = bad
                            _report_non_finite(pt, bad, plan, None)
                        if on_tensor:
                            on_tensor(pt)
                        continue
                    for k, (pt, out) in enumerate(iter_computed(plan, group, loader, seed=plan.seed, device=device,
                                                                memory_budget=memory_budget)):
                        if pending is not None:
                            pending.result()
                        pending = write_pool.submit(writer.write, pt.name, out)
                        bad = count_non_finite(out)
                        if bad:
                            non_finite[pt.name] = bad
                            _report_non_finite(pt, bad, plan, loader)
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
            res = ShardResult(shard.index, shard.filename, digest, writer.total_bytes, list(shard.tensors),
                              non_finite)
            results.append(res)
            if on_shard:
                on_shard(res)
    return results
