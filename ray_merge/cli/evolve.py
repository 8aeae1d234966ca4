"""`ray-merge evolve`: evolutionary merge search (the search itself lives in the `evolve` package).
"""
from __future__ import annotations

import os

from ray_merge.cli.options import add_options, options_from_args
from ray_merge.options import CommandFlags, EvolveOptions, MergeOptions, WorkerSpec


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolve", help="search for a good merge with CMA-ES, scoring candidates in memory with lm-eval",
        description="Evolve merge recipes: CMA-ES proposes them, Ray evaluator actors (one per GPU, or per CPU "
                    "slot) merge each in memory and score it with lm-eval (HF or vLLM backend). The config takes "
                    "mergekit-evolve's genome and tasks sections. Kill it any time; --resume continues.")
    p.add_argument("config", help="search config (YAML: genome, tasks, search, evaluation)")
    add_options(p, EvolveOptions, only=["storage_path"])
    add_options(p, MergeOptions, only=["resume"], help={"resume": "continue the search stored in --storage-path"})
    add_options(p, CommandFlags, only=["overrides"], help={
        "overrides": "override a config value, e.g. --set evaluation.limit=50 (repeatable)"})
    add_options(p, WorkerSpec, only=["workers", "address"], help={
        "workers": "evaluator actors (default: one per GPU, else one per evaluation.num_cpus CPUs)",
        "address": "an existing Ray cluster (auto, HOST:PORT); default: the job's cluster inside `ray job "
                   "submit`, else a local instance"})
    add_options(p, EvolveOptions, only=["backend", "max_fevals", "popsize", "sigma0"])
    add_options(p, MergeOptions, only=["random_seed"], help={
        "random_seed": "seed of the search (default: config's seed)"})
    add_options(p, EvolveOptions, only=["limit", "batch_size", "task_search_path", "no_report"])
    add_options(p, CommandFlags, only=["verbose"])
    add_options(p, MergeOptions, only=["quiet"])
    p.set_defaults(func=cmd_evolve)


def _overrides(args, ev: EvolveOptions) -> list[str]:
    out = list(args.overrides)
    if ev.backend:
        out.append(f"evaluation.backend={ev.backend}")
    if ev.limit is not None:
        out.append(f"evaluation.limit={int(ev.limit) if ev.limit >= 1 else ev.limit}")
    if ev.batch_size is not None:
        out.append(f"evaluation.batch_size={ev.batch_size}")
    return out


def cmd_evolve(args) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from evolve.config import load_config, resolve_path
    from evolve.search import RunOptions, run_search
    from ray_merge.errors import UserError

    ev = options_from_args(args, EvolveOptions)
    for flag, v in (("--workers", args.workers), ("--max-fevals", ev.max_fevals), ("--popsize", ev.popsize)):
        if v is not None and v < (2 if flag == "--popsize" else 1):
            raise UserError(f"{flag} must be at least {2 if flag == '--popsize' else 1}")
    if ev.sigma0 is not None and ev.sigma0 <= 0:
        raise UserError("--sigma0 must be positive")
    cfg = load_config(args.config, _overrides(args, ev))
    if ev.task_search_path:
        extra = [resolve_path(p, os.getcwd()) for p in ev.task_search_path]
        for p in extra:
            if not os.path.isdir(p):
                raise UserError(f"--task-search-path {p}: no such directory")
        cfg.evaluation.include_paths = cfg.evaluation.include_paths + extra
        cfg.raw["evaluation"]["include_paths"] = cfg.evaluation.include_paths
    opts = RunOptions(resume=args.resume, workers=args.workers, address=args.address, verbose=args.verbose,
                      quiet=args.quiet, report=not ev.no_report, max_fevals=ev.max_fevals,
                      popsize=ev.popsize, sigma0=ev.sigma0, seed=args.random_seed)
    run_search(cfg, args.storage_path, opts)
    return 0
