"""The in-process executor: every shard in this process, one after another.
"""
from __future__ import annotations

from ray_merge.execute.shards import ShardResult, write_shards
from ray_merge.io.storage import parse_storage_options
from ray_merge.options import MergeOptions
from ray_merge.planner.memory import memory_budget
from ray_merge.planner.plan import Plan


def run_in_process(plan: Plan, shards, stage: str, options: MergeOptions, on_shard, progress=None) -> list[ShardResult]:
    budget = memory_budget(options.memory_budget)
    return write_shards(plan, shards, stage, device=options.device, memory_budget=budget,
                        on_tensor=(lambda pt: progress.update(pt.out_bytes)) if progress else None,
                        on_shard=on_shard, storage_options=parse_storage_options(options.storage_options))
