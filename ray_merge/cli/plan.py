"""`ray-merge plan RECIPE`: what a recipe will do, without reading tensors.
"""
from __future__ import annotations

from ray_merge.cli.options import add_worker_options, options_from_args, plan_assignment, wants_ray
from ray_merge.cli.run import add_merge_flags
from ray_merge.options import MergeOptions


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="show what a recipe will do, without reading tensors")
    p.add_argument("recipe", help="mergekit-style YAML recipe")
    add_merge_flags(p)
    add_worker_options(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ray_merge.engine import make_plan
    from ray_merge.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    options = options_from_args(args, MergeOptions)
    plan = make_plan(recipe, options)
    print(format_plan(plan))
    if wants_ray(args):
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
