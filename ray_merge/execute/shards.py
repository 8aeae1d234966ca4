"""Writing output shards: each shard's tensors computed in order (or in row chunks when over the budget)
and streamed into its safetensors file, checksummed.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ray_merge.execute.loaders import TensorLoader
from ray_merge.execute.stream import iter_computed, iter_row_chunks, row_groups
from ray_merge.io.writer import ShardWriter
from ray_merge.planner.plan import Plan, PlannedTensor, Shard

# Ray workers write each shard under <staging>/ATTEMPTS_DIR, then rename it into place.
ATTEMPTS_DIR = ".ray-merge-attempts"

@dataclass
class ShardResult:
    index: int
    filename: str
    checksum: str  # xxh3-128 of the file, hex
    nbytes: int
    tensors: list[str]


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
                for group, rows in row_groups(tensors, memory_budget):
                    if rows is not None:  # over the budget: merged and written a few rows at a time
                        if pending is not None:
                            pending.result()
                            pending = None
                        pt = group[0]
                        for _, chunk in iter_row_chunks(pt, loader, rows, seed=plan.seed, device=device):
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
