"""`ray-merge moe CONFIG OUT`: a mixture of experts from dense models (mergekit-moe).
"""
from __future__ import annotations

import sys

from ray_merge.cli.options import add_noted_flags, add_options, add_tool_flags, merge_options, print_notes
from ray_merge.options import MergeOptions


def add_parser(sub) -> None:
    p = sub.add_parser(
        "moe",
        help="assemble a mixture of experts (Mixtral / Qwen2-MoE) from dense models (mergekit-moe config)",
        description="Build a Mixtral or Qwen2-MoE model: attention and norms from base_model, one MLP expert "
                    "per entry of `experts`, router weights from gate_mode (hidden, cheap_embed, random, "
                    "uniform_random).",
    )
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("out", help="output directory")
    add_options(p, MergeOptions, only=["out_shard_bytes", "random_seed", "copy_tokenizer", "write_model_card"],
                help={"random_seed": "seed for random gates and expert noise"})
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                   action="store_true", help="allow every expert to be the same model (for further training)")
    add_noted_flags(p, ("--load-in-4bit", "--load-in-8bit"))
    add_tool_flags(p)
    p.set_defaults(func=cmd_moe)


def cmd_moe(args) -> int:
    from ray_merge.tools.moe import MoEOptions, build_moe, load_moe_config

    print_notes(args)
    options = merge_options(args)
    config = load_moe_config(args.config)
    opts = MoEOptions(
        device=options.device,
        out_shard_bytes=options.out_shard_bytes,
        random_seed=options.random_seed,
        copy_tokenizer=options.copy_tokenizer,
        write_model_card=options.write_model_card,
        allow_all_same=args.allow_all_same,
        trust_remote_code=options.trust_remote_code,
        quiet=options.quiet,
    )
    result = build_moe(config, args.out, opts)
    if not args.quiet:
        print(f"wrote a {result.architecture} model ({result.num_experts} experts, {result.experts_per_token} "
              f"per token, {result.num_tensors} tensors) to {result.out} in {result.seconds:.1f}s",
              file=sys.stderr)
    return 0
