"""`ray-merge extract-lora`: a PEFT LoRA adapter from a fine-tune and its base (mergekit-extract-lora).
"""
from __future__ import annotations

import argparse
import sys

from ray_merge.cli.options import (
    add_options,
    add_tool_flags,
    add_worker_options,
    merge_options,
    print_notes,
    worker_spec,
)
from ray_merge.options import MergeOptions


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tune and its base (truncated SVD)",
        description="Approximate (fine-tune - base) per linear module by truncated SVD and write a PEFT "
                    "adapter (adapter_config.json + adapter_model.safetensors). Prints the relative "
                    "reconstruction error per module type.",
    )
    p.add_argument("--model", required=True, help="fine-tuned model (path or hub id)")
    p.add_argument("--base-model", required=True, help="base model (path or hub id)")
    p.add_argument("--out-path", required=True, help="output directory for the adapter")
    p.add_argument("--max-rank", "--rank", dest="max_rank", type=int, default=128,
                   help="maximum LoRA rank (default 128)")
    p.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this (default 0: keep max-rank)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split singular values between A and B (sqrt each); else all in A")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factor embeddings too (default: save them at full rank in modules_to_save)")
    p.add_argument("--save-module", dest="modules_to_save", action="append", default=[], metavar="NAME",
                   help="save this module (name or suffix, e.g. lm_head) at full rank (repeatable)")
    p.add_argument("-i", "--include-regex", dest="include_regexes", action="append", default=[], metavar="RE",
                   help="only modules whose name matches (repeatable)")
    p.add_argument("-e", "--exclude-regex", dest="exclude_regexes", action="append", default=[], metavar="RE",
                   help="leave out modules whose name matches (repeatable)")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out changed modules that are not Linear/Embedding (norms) instead of saving them")
    p.add_argument("--lora-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="carry bias changes as PEFT lora_bias (default: when some bias changed)")
    p.add_argument("--svd", choices=("auto", "full", "lowrank"), default="auto",
                   help="full (exact) SVD, randomized low-rank SVD, or auto: full unless it exceeds the "
                        "memory budget")
    add_options(p, MergeOptions, only=["memory_budget"], help={
        "memory_budget": "peak memory per module decomposition, e.g. 4GiB (default: 60%% of available RAM)"})
    add_tool_flags(p)
    add_worker_options(p)  # as `run`: --workers/--address, --worker-memory/gpus/cpus/resource
    p.set_defaults(func=cmd_extract_lora)


def cmd_extract_lora(args) -> int:
    from ray_merge.tools.lora import LoraOptions, extract_lora, format_report, main_summary_line

    print_notes(args)
    options = merge_options(args)
    opts = LoraOptions(
        max_rank=args.max_rank,
        sv_epsilon=args.sv_epsilon,
        distribute_scale=args.distribute_scale,
        embed_lora=args.embed_lora,
        modules_to_save=args.modules_to_save,
        include_regexes=args.include_regexes,
        exclude_regexes=args.exclude_regexes,
        skip_undecomposable=args.skip_undecomposable,
        lora_bias=args.lora_bias,
        svd=args.svd,
        device=options.device,
        memory_budget=options.memory_budget,
        ray=worker_spec(args),
        verbose=args.verbose,
        trust_remote_code=options.trust_remote_code,
        quiet=options.quiet,
    )
    summary = extract_lora(args.model, args.base_model, args.out_path, opts)
    print(format_report(summary))
    if not args.quiet:
        print(main_summary_line(summary), file=sys.stderr)
    return 0
