"""`ray-merge extract-lora`, `ray-merge moe` and `ray-merge multi` (mergekit's other tools).
"""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
        p.add_argument("--cuda", action="store_true", help="same as --device cuda")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--async-write", "--multi-gpu"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-lazy-unpickle", action="store_true", help=argparse.SUPPRESS)


def _device(args) -> str:
    from ray_merge.cli.merge import _check_device

    device = "cuda" if getattr(args, "cuda", False) else (getattr(args, "device", None) or "cpu")
    _check_device(device)
    return device


def add_parser(sub) -> None:
    from ray_merge.cli.options import add_worker_options
    from ray_merge.units import parse_size

    # ---------------------------------------------------------------- extract-lora
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
    p.add_argument("--memory-budget", type=parse_size, default=None,
                   help="peak memory per module decomposition, e.g. 4GiB (default: 60%% of available RAM)")
    _common(p)
    add_worker_options(p)  # as `run`: --workers/--address, --worker-memory/gpus/cpus/resource
    p.set_defaults(func=cmd_extract_lora)

    # ---------------------------------------------------------------- moe
    p = sub.add_parser(
        "moe",
        help="assemble a mixture of experts (Mixtral / Qwen2-MoE) from dense models (mergekit-moe config)",
        description="Build a Mixtral or Qwen2-MoE model: attention and norms from base_model, one MLP expert "
                    "per entry of `experts`, router weights from gate_mode (hidden, cheap_embed, random, "
                    "uniform_random).",
    )
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out", help="output directory")
    p.add_argument("--out-shard-size", type=parse_size, default="5B",
                   help="max bytes per output shard (default 5B = 5e9, as mergekit)")
    p.add_argument("--random-seed", type=int, default=None, help="seed for random gates and expert noise")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                   action="store_true", help="allow every expert to be the same model (for further training)")
    p.add_argument("--load-in-4bit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load-in-8bit", action="store_true", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_moe)

    # ---------------------------------------------------------------- multi
    from ray_merge.cli.merge import add_merge_options

    p = sub.add_parser(
        "multi",
        help="run several dependent recipes from one file (mergekit-multi format)",
        description="Run the recipes of a multi-document YAML file in dependency order. A recipe with "
                    "`name: X` is written to OUT_DIR/X and later recipes may use X as a model. Finished "
                    "stages are skipped on a rerun; independent stages run at once with --workers.",
    )
    add_merge_options(p)  # FILE, --set (applies to every stage), seeds, shard size, memory budget, ...
    for action in p._actions:
        if action.dest == "recipe":
            action.metavar, action.help = "FILE", "YAML file of recipes separated by ---"
        elif action.dest == "overrides":
            action.help = "override a value in every recipe, e.g. --set dtype=float32 (repeatable)"
    p.add_argument("out_dir", nargs="?", default=None, metavar="OUT_DIR",
                   help="directory for the named stages (or give -I/--intermediate-dir)")
    p.add_argument("-I", "--intermediate-dir", default=None, help="same as OUT_DIR (mergekit's flag)")
    p.add_argument("--out-path", default=None,
                   help="output of the unnamed (final) recipe, if any (default OUT_DIR/final)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="skip stages whose output is already complete (default); --no-lazy rebuilds them")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--cuda", action="store_true", help="same as --device cuda")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True)
    add_worker_options(p)  # each worker runs one stage; independent stages run at once
    p.set_defaults(func=cmd_multi)


def _noop_notes(args) -> None:
    for flag in ("lazy_unpickle", "no_lazy_unpickle", "low_cpu_memory", "read_to_gpu", "async_write"):
        if getattr(args, flag, False):
            print(f"ray-merge: note: --{flag.replace('_', '-')} has no effect (reads are lazy and streamed)",
                  file=sys.stderr)
    if getattr(args, "multi_gpu", False):
        print("ray-merge: note: --multi-gpu: use --workers/--address to spread work over devices",
              file=sys.stderr)


def _worker_spec(args):
    """The Ray worker spec from --workers/--address/--worker-*, or None to work in this process."""
    from ray_merge.cli.options import spec_from_args, wants_ray
    from ray_merge.errors import UserError

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    return spec_from_args(args) if wants_ray(args) else None


def cmd_extract_lora(args) -> int:
    from ray_merge.tools.lora import (
        LoraOptions,
        extract_lora,
        format_report,
        main_summary_line,
    )

    _noop_notes(args)
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
        device=_device(args),
        memory_budget=args.memory_budget,
        ray=_worker_spec(args),
        verbose=args.verbose,
        trust_remote_code=args.trust_remote_code,
        quiet=args.quiet,
    )
    summary = extract_lora(args.model, args.base_model, args.out_path, opts)
    print(format_report(summary))
    if not args.quiet:
        print(main_summary_line(summary), file=sys.stderr)
    return 0


def cmd_moe(args) -> int:
    from ray_merge.tools.moe import MoEOptions, build_moe, load_moe_config

    _noop_notes(args)
    if args.load_in_4bit or args.load_in_8bit:
        print("ray-merge: note: --load-in-4bit/8bit are not supported; the base model is run in bfloat16",
              file=sys.stderr)
    config = load_moe_config(args.config)
    opts = MoEOptions(
        device=_device(args),
        out_shard_bytes=args.out_shard_size,
        random_seed=args.random_seed,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        allow_all_same=args.allow_all_same,
        trust_remote_code=args.trust_remote_code,
        quiet=args.quiet,
    )
    result = build_moe(config, args.out, opts)
    if not args.quiet:
        print(f"wrote a {result.architecture} model ({result.num_experts} experts, {result.experts_per_token} "
              f"per token, {result.num_tensors} tensors) to {result.out} in {result.seconds:.1f}s",
              file=sys.stderr)
    return 0


def cmd_multi(args) -> int:
    from ray_merge.cli.merge import _options
    from ray_merge.errors import UserError
    from ray_merge.tools.multi import run_multi

    out_dir = args.out_dir or args.intermediate_dir
    if args.out_dir and args.intermediate_dir and args.out_dir != args.intermediate_dir:
        raise UserError("give OUT_DIR or --intermediate-dir, not both")
    if not out_dir:
        raise UserError("multi needs an output directory (OUT_DIR or --intermediate-dir)")
    options = _options(args)
    _device(args)
    spec = _worker_spec(args)  # checks --workers before anything runs
    results = run_multi(args.recipe, out_dir, options, out_path=args.out_path, lazy=args.lazy,
                        overrides=args.overrides, ray=spec, verbose=args.verbose)
    for r in results:
        print(f"{r.label:<24} {r.status:<8} {r.out}" + (f"  ({r.seconds:.1f}s)" if r.status == "merged" else ""))
    return 0
