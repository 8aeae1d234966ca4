"""One merge, start to finish: plan, execute (in process or on Ray), finalize.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, Optional

from ray_merge.execute.local import run_in_process
from ray_merge.execute.shards import ATTEMPTS_DIR, ShardResult
from ray_merge.io.storage import is_url, local_path
from ray_merge.options import MergeOptions
from ray_merge.output.remote import prepare_remote_output
from ray_merge.output.staging import check_output_location, prepare_output
from ray_merge.planner.memory import check_memory, memory_budget
from ray_merge.planner.plan import Plan, plan_recipe
from ray_merge.recipe.schema import Recipe

log = logging.getLogger("ray_merge")


def make_plan(recipe: Recipe, options: MergeOptions) -> Plan:
    return plan_recipe(recipe, out_shard_bytes=options.out_shard_bytes, allow_crimes=options.allow_crimes,
                       seed=options.random_seed, trust_remote_code=options.trust_remote_code,
                       unsafe_truncate_embeddings=options.unsafe_truncate_embeddings)


# An executor takes (plan, shards to do, staging dir, options, on_shard) and writes those shards.
ShardExecutor = Callable[..., list[ShardResult]]


def check_budget(plan: Plan, options: MergeOptions) -> None:
    """Fail before any work when a tensor cannot be merged within the memory budget."""

    # tensors over the budget are merged in row chunks where the method allows it
    check_memory(plan, plan.shards, memory_budget(options.memory_budget))


def run_merge(recipe: Recipe, out_dir: str, options: MergeOptions,
              executor: Optional[ShardExecutor] = None, plan: Optional[Plan] = None) -> Plan:
    """Merge ``recipe`` into ``out_dir`` (a local directory, or an fsspec URL such as ``s3://bucket/prefix``
    opened with ``options.storage_options``). Returns the plan that was executed.

    Hub models' weights are not downloaded here: whoever reads a weight file (this process, or the Ray
    worker merging a shard that needs it) fetches that file when it reads its first tensor.
    """
    from tqdm.auto import tqdm

    if not is_url(out_dir):  # a bad output location is told before planning reads (or downloads) anything
        check_output_location(local_path(out_dir))
    plan = plan or make_plan(recipe, options)
    executor = executor or run_in_process
    getattr(executor, "preflight", check_budget)(plan, options)
    if is_url(out_dir):
        staging = prepare_remote_output(out_dir, plan, resume=options.resume,
                                        storage_options=options.storage_options)
    else:
        staging = prepare_output(local_path(out_dir), plan, resume=options.resume)
    stage = staging.path
    records = dict(staging.done)
    try:
        todo = [s for s in plan.shards if s.index not in records]
        if records:
            log.info("resuming: %d of %d shards already finished", len(records), len(plan.shards))

        def on_shard(res: ShardResult) -> None:
            staging.journal(res)
            records[res.index] = {"index": res.index, "filename": res.filename, "checksum": res.checksum,
                                  "nbytes": res.nbytes, "non_finite": res.non_finite}

        total = sum(s.nbytes for s in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=options.quiet) as bar:
            executor(plan, todo, staging.shard_dir, options, on_shard, progress=bar)
        # an executor may say how it ran (the Ray executor: per-worker stats) for the manifest
        extra = getattr(executor, "manifest_extra", None)
        if staging.local:
            shutil.rmtree(os.path.join(stage, ATTEMPTS_DIR), ignore_errors=True)

        staging.finalize(plan, records, copy_tokenizer=options.copy_tokenizer,
                         write_model_card=options.write_model_card,
                         extra_manifest=extra() if callable(extra) else extra)
    except BaseException:
        if not records and staging.exists():
            # nothing finished that --resume could reuse: take our staging directory away, so that it
            # does not block the next run
            if staging.local:
                shutil.rmtree(os.path.join(stage, ATTEMPTS_DIR), ignore_errors=True)
                staging.discard()
            else:
                staging.discard(plan)
        raise
    finally:
        staging.release()
    return plan
