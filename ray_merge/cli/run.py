"""`ray-merge run RECIPE OUT`: merge a recipe, in process or on Ray workers.

Also the flags `plan`, `submit` and `multi` share with `run`.
"""
from __future__ import annotations

import sys
import time

from ray_merge.cli.options import (
    add_noted_flags,
    add_options,
    add_worker_options,
    executor_from_args,
    merge_options,
    print_notes,
    wants_ray,
)
from ray_merge.options import CommandFlags, MergeOptions

RUN_NOTED_FLAGS = ("--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--async-write")


def add_merge_flags(p, help=None) -> None:
    """Flags of every command that plans a recipe (run, plan, submit, multi)."""
    add_options(p, CommandFlags, only=["overrides"], help=help)
    add_options(p, MergeOptions, only=["random_seed", "out_shard_bytes", "allow_crimes", "trust_remote_code",
                                       "memory_budget", "unsafe_truncate_embeddings"], help=help)
    add_options(p, CommandFlags, only=["verbose"])
    add_options(p, MergeOptions, only=["quiet"])


def add_run_flags(p) -> None:
    """`run`'s own arguments (after add_merge_flags); `submit` forwards them to the job's `run`."""
    p.add_argument("out", help="output directory (written under a temporary name, renamed when complete), or "
                               "an fsspec URL such as s3://bucket/prefix")
    add_options(p, MergeOptions, only=["device", "copy_tokenizer", "write_model_card", "resume", "storage_options"])
    add_noted_flags(p, RUN_NOTED_FLAGS)
    add_worker_options(p)


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a merge recipe")
    p.add_argument("recipe", help="mergekit-style YAML recipe")
    add_merge_flags(p)
    add_run_flags(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from ray_merge.engine import run_merge
    from ray_merge.recipe.load import load_recipe

    print_notes(args)
    options = merge_options(args)
    recipe = load_recipe(args.recipe, args.overrides)
    executor = executor_from_args(args) if wants_ray(args) else None
    start = time.time()
    plan = run_merge(recipe, args.out, options, executor=executor)
    if executor is not None and args.verbose and executor.slots:
        print(executor.format_stats(), file=sys.stderr)
    if not args.quiet:
        print(f"wrote {len(plan.tensors)} tensors in {len(plan.shards)} shard(s) to {args.out} "
              f"in {time.time() - start:.1f}s", file=sys.stderr)
    return 0
