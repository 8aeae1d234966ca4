"""`ray-merge multi FILE OUT_DIR`: several dependent recipes from one file (mergekit-multi).
"""
from __future__ import annotations

import argparse

from ray_merge.cli.options import add_options, add_worker_options, merge_options, worker_spec
from ray_merge.cli.run import add_merge_flags
from ray_merge.options import MergeOptions


def add_parser(sub) -> None:
    p = sub.add_parser(
        "multi",
        help="run several dependent recipes from one file (mergekit-multi format)",
        description="Run the recipes of a multi-document YAML file in dependency order. A recipe with "
                    "`name: X` is written to OUT_DIR/X and later recipes may use X as a model. Finished "
                    "stages are skipped on a rerun; independent stages run at once with --workers.",
    )
    p.add_argument("recipe", metavar="FILE", help="YAML file of recipes separated by ---")
    add_merge_flags(p, help={  # --set applies to every stage
        "overrides": "override a value in every recipe, e.g. --set dtype=float32 (repeatable)"})
    p.add_argument("out_dir", nargs="?", default=None, metavar="OUT_DIR",
                   help="directory for the named stages (or give -I/--intermediate-dir)")
    p.add_argument("-I", "--intermediate-dir", default=None, help="same as OUT_DIR (mergekit's flag)")
    p.add_argument("--out-path", default=None,
                   help="output of the unnamed (final) recipe, if any (default OUT_DIR/final)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="skip stages whose output is already complete (default); --no-lazy rebuilds them")
    add_options(p, MergeOptions, only=["device", "copy_tokenizer", "write_model_card"])
    add_worker_options(p)  # each worker runs one stage; independent stages run at once
    p.set_defaults(func=cmd_multi)


def cmd_multi(args) -> int:
    from ray_merge.errors import UserError
    from ray_merge.tools.multi import run_multi

    out_dir = args.out_dir or args.intermediate_dir
    if args.out_dir and args.intermediate_dir and args.out_dir != args.intermediate_dir:
        raise UserError("give OUT_DIR or --intermediate-dir, not both")
    if not out_dir:
        raise UserError("multi needs an output directory (OUT_DIR or --intermediate-dir)")
    options = merge_options(args)
    spec = worker_spec(args)  # checks --workers before anything runs
    results = run_multi(args.recipe, out_dir, options, out_path=args.out_path, lazy=args.lazy,
                        overrides=args.overrides, ray=spec, verbose=args.verbose)
    for r in results:
        print(f"{r.label:<24} {r.status:<8} {r.out}" + (f"  ({r.seconds:.1f}s)" if r.status == "merged" else ""))
    return 0
