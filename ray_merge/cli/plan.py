"""`ray-merge plan RECIPE`: what a recipe will do, without reading tensors.

With ``--workers N``: the shards each worker would get, its bytes read and written and its peak memory; with
``--throughput-from bench.json`` also its estimated wall time (see ``planner.shards.estimate_seconds``).
"""
from __future__ import annotations

from ray_merge.cli.options import add_options, add_worker_options, options_from_args, spec_from_args, wants_ray
from ray_merge.cli.run import add_merge_flags
from ray_merge.options import MergeOptions, PlanOptions


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="show what a recipe will do, without reading tensors")
    p.add_argument("recipe", help="mergekit-style YAML recipe")
    add_merge_flags(p)
    add_options(p, PlanOptions)
    add_worker_options(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ray_merge.engine import make_plan
    from ray_merge.planner.memory import memory_budget
    from ray_merge.planner.shards import assign_shards, format_assignment, format_estimate
    from ray_merge.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    options = options_from_args(args, MergeOptions)
    bench = options_from_args(args, PlanOptions).throughput_from
    plan = make_plan(recipe, options)
    rate = read_throughput(bench, plan.method) if bench else None
    print(format_plan(plan))
    if wants_ray(args):
        loads = worker_loads(plan, args, options)
        if loads is None:
            print("workers:       one per node of the cluster (pass --workers N to see an assignment)")
            return 0
        print(format_assignment(plan, loads))
        print(format_estimate(loads, rate))
    elif rate is not None:  # in process: one worker under this process's budget
        print("in process:")
        print(format_estimate(assign_shards(plan, plan.shards, [memory_budget(options.memory_budget)]), rate))
    return 0


def worker_loads(plan, args, options: MergeOptions):
    """The assignment the driver would make for `--workers N` (None: one worker per node, unknown here)."""
    from ray_merge.planner.memory import check_memory, planned_budgets
    from ray_merge.planner.shards import assign_shards

    spec = spec_from_args(args)
    if not spec.workers:
        return None
    budgets = planned_budgets(spec, options, spec.workers)
    if budgets[0] is not None:
        check_memory(plan, plan.shards, budgets[0])
    return assign_shards(plan, plan.shards, budgets)


def read_throughput(path: str, method: str):
    """The rates measured for ``method`` in a bench.json (schema: scripts/bench_merge.py's docstring):
    ``methods.METHOD.read_bytes_per_s``, ``write_bytes_per_s`` and ``compute_s_per_byte``."""
    import json

    from ray_merge.errors import UserError
    from ray_merge.planner.shards import Throughput

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", source=path) from e
    except ValueError as e:
        raise UserError(f"not JSON: {e}", source=path) from e
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, dict):
        raise UserError("no 'methods' table (written by scripts/bench_merge.py)", source=path)
    if method not in methods:
        raise UserError(f"no measurements for {method} (it has: {', '.join(sorted(methods)) or 'none'}); "
                        f"run scripts/bench_merge.py --methods {method}", source=path, key=f"methods.{method}")
    values = {}
    for key in ("read_bytes_per_s", "write_bytes_per_s", "compute_s_per_byte"):
        v = methods[method].get(key) if isinstance(methods[method], dict) else None
        positive = key != "compute_s_per_byte"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= 0 if positive else v < 0):
            need = "a positive number" if positive else "a number >= 0"
            raise UserError(f"needs {need}, got {v!r}", source=path, key=f"methods.{method}.{key}")
        values[key] = float(v)
    return Throughput(method, **values)


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
