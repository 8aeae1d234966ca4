"""`ray-merge run`, `ray-merge plan` and `ray-merge methods`.
"""
from __future__ import annotations

import argparse
import sys
import time

from ray_merge.methods.base import REQUIRED


def add_merge_options(p: argparse.ArgumentParser) -> None:
    from ray_merge.units import parse_size

    p.add_argument("recipe", help="mergekit-style YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set parameters.t=0.3 (repeatable)")
    p.add_argument("--random-seed", type=int, default=None, help="seed for randomised methods (default 0)")
    p.add_argument("--out-shard-size", type=parse_size, default="5B",
                   help="max bytes per output shard (default 5B = 5e9, as mergekit)")
    p.add_argument("--allow-crimes", action="store_true", help="allow merging different architectures")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--memory-budget", type=parse_size, default=None,
                   help="peak memory for tensor work, e.g. 2GiB (default: 60%% of available RAM)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_run_options(run: argparse.ArgumentParser) -> None:
    """`run`'s own options (after add_merge_options); `submit` forwards them to the job's `run`."""
    from ray_merge.cli.options import add_worker_options

    run.add_argument("out", help="output directory (written under a temporary name, renamed when complete)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default cpu)")
    run.add_argument("--cuda", action="store_true", help="same as --device cuda")
    run.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--resume", action="store_true", help="finish an interrupted merge, keeping finished shards")
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--async-write"):
        run.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    add_worker_options(run)


def add_parser(sub) -> None:
    from ray_merge.cli.options import add_worker_options

    run = sub.add_parser("run", help="run a merge recipe")
    add_merge_options(run)
    add_run_options(run)
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="show what a recipe will do, without reading tensors")
    add_merge_options(plan)
    add_worker_options(plan)
    plan.set_defaults(func=cmd_plan)

    methods = sub.add_parser("methods", help="list merge methods and their parameters")
    methods.set_defaults(func=cmd_methods)

    demo = sub.add_parser("demo", help="build small local models and merge them (the recipe of configs/demo.yml)")
    demo.add_argument("--workdir", default="demo_out", help="where the models and the merge go (default demo_out)")
    demo.add_argument("--recipe", default=None, help="a recipe whose model paths start with DEMO/ (default: the built-in demo recipe)")
    demo.set_defaults(func=cmd_demo)


def _options(args):
    from ray_merge.options import MergeOptions

    device = "cuda" if getattr(args, "cuda", False) else (getattr(args, "device", None) or "cpu")
    return MergeOptions(
        device=device,
        random_seed=args.random_seed,
        out_shard_bytes=args.out_shard_size,
        memory_budget=args.memory_budget,
        copy_tokenizer=getattr(args, "copy_tokenizer", True),
        write_model_card=getattr(args, "write_model_card", True),
        allow_crimes=args.allow_crimes,
        trust_remote_code=args.trust_remote_code,
        resume=getattr(args, "resume", False),
        quiet=args.quiet,
    )


def _check_device(device: str) -> None:
    from ray_merge.errors import UserError

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")


def cmd_run(args) -> int:
    from ray_merge.engine import run_merge
    from ray_merge.recipe.load import load_recipe

    for flag in ("lazy_unpickle", "low_cpu_memory", "read_to_gpu", "async_write"):
        if getattr(args, flag, False):
            print(f"ray-merge: note: --{flag.replace('_', '-')} has no effect (reads are lazy and streamed)",
                  file=sys.stderr)
    options = _options(args)
    _check_device(options.device)
    recipe = load_recipe(args.recipe, args.overrides)
    executor = None
    if getattr(args, "workers", None) or getattr(args, "address", None):  # on Ray: ray_merge/distributed.py
        from ray_merge.cli.options import executor_from_args

        executor = executor_from_args(args)
    start = time.time()
    plan = run_merge(recipe, args.out, options, executor=executor)
    if executor is not None and args.verbose and executor.slots:
        print(executor.format_stats(), file=sys.stderr)
    if not args.quiet:
        print(f"wrote {len(plan.tensors)} tensors in {len(plan.shards)} shard(s) to {args.out} "
              f"in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from ray_merge.engine import make_plan
    from ray_merge.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    options = _options(args)
    plan = make_plan(recipe, options)
    print(format_plan(plan))
    if getattr(args, "workers", None) or getattr(args, "address", None):
        from ray_merge.cli.options import plan_assignment

        print(plan_assignment(plan, args, options))
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def format_plan(plan) -> str:
    lines = [
        f"recipe:        {plan.recipe.source}",
        f"method:        {plan.method}",
        f"models:        {len(plan.models)}",
    ]
    lines += [f"  [{i}] {m.ref}" for i, m in enumerate(plan.models)]
    lines += [
        f"tensors:       {len(plan.tensors)}",
        f"shards:        {len(plan.shards)}",
        f"bytes read:    {_gb(plan.bytes_read)}",
        f"bytes written: {_gb(plan.bytes_written)}",
        f"peak working set (largest tensor): {_gb(plan.peak_working_bytes)}",
        f"output layers: {plan.out_config.get('num_hidden_layers', plan.out_config.get('n_layer', '?'))}",
    ]
    for s in plan.shards:
        lines.append(f"  {s.filename}: {len(s.tensors)} tensors, {_gb(s.nbytes)}")
    return "\n".join(lines)


def cmd_methods(args) -> int:
    from ray_merge.methods import all_methods

    for m in all_methods().values():
        base = {"required": "base model required", "optional": "base model optional", "none": "no base model"}
        flags = [base[m.base_model]]
        if m.randomized:
            flags.append("randomised")
        print(f"{m.name}  ({', '.join(flags)})")
        for p in m.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.default is REQUIRED else f"default {p.default!r}"
            print(f"    {p.name:<18} {scope:<9} {default:<16} {p.help}")
    return 0


def cmd_demo(args) -> int:
    """The README's first command: a real merge end to end, no cluster, nothing downloaded."""
    import os
    import shutil

    from ray_merge.demo import DEMO_RECIPE, make_demo_models
    from ray_merge.engine import run_merge
    from ray_merge.errors import UserError
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import recipe_from_conf

    if args.recipe and not os.path.isfile(args.recipe):
        raise UserError("demo recipe not found", source=args.recipe)
    recipe_path = args.recipe or "<demo recipe>"
    models = os.path.join(os.path.abspath(args.workdir), "models")
    if not os.path.isdir(os.path.join(models, "llama_ft1")):
        print(f"building demo models in {models} ...", file=sys.stderr)
        make_demo_models(models)
    from omegaconf import OmegaConf

    text = (open(args.recipe).read() if args.recipe else DEMO_RECIPE).replace("DEMO/", models + "/")
    recipe = recipe_from_conf(OmegaConf.create(text), source=recipe_path)
    out = os.path.join(os.path.abspath(args.workdir), "merged")
    if os.path.isdir(out):
        shutil.rmtree(out)
    start = time.time()
    plan = run_merge(recipe, out, MergeOptions(random_seed=0))
    print(format_plan(plan))
    print(f"merged {len(plan.tensors)} tensors in {time.time() - start:.1f}s -> {out}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3 w4", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(f"loaded with transformers: {type(model).__name__}, logits {tuple(logits.shape)}, "
          f"next token after 'w1 w2 w3 w4': {tok.decode(logits[0, -1].argmax().item())!r}")
    return 0
