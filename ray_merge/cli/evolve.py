"""`ray-merge evolve`: evolutionary merge search (the search itself lives in the `evolve` package).
"""
from __future__ import annotations

import os
import sys

from ray_merge.cli.options import add_noted_flags, add_options, options_from_args, print_notes
from ray_merge.options import CommandFlags, EvolveOptions, MergeOptions, WorkerSpec

EVOLVE_NOTED_FLAGS = ("--load-in-4bit", "--load-in-8bit")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolve", help="search for a good merge with CMA-ES, scoring candidates in memory with lm-eval",
        description="Evolve merge recipes: CMA-ES proposes them, Ray evaluator actors (one per GPU, or per CPU "
                    "slot) merge each in memory and score it with lm-eval (HF or vLLM backend). The config takes "
                    "mergekit-evolve's genome and tasks sections, and the command its flags. Kill it any time; "
                    "--resume continues.")
    p.add_argument("config", help="search config (YAML: genome, tasks, search, evaluation)")
    add_options(p, EvolveOptions, only=["storage_path"])
    add_options(p, MergeOptions, only=["resume"], help={"resume": "continue the search stored in --storage-path"})
    add_options(p, CommandFlags, only=["overrides"], help={
        "overrides": "override a config value, e.g. --set evaluation.limit=50 (repeatable)"})
    add_options(p, WorkerSpec, only=["workers", "address"], help={
        "workers": "evaluator actors (default: one per GPU, else one per evaluation.num_cpus CPUs)",
        "address": "an existing Ray cluster (auto, HOST:PORT); default: the job's cluster inside `ray job "
                   "submit`, else a local instance"})
    add_options(p, EvolveOptions, only=["backend", "max_fevals", "max_time", "patience", "eval_timeout", "popsize",
                                        "sigma0"])
    add_options(p, MergeOptions, only=["random_seed", "allow_crimes"], help={
        "random_seed": "seed of the search (default: config's seed)"})
    add_options(p, EvolveOptions, only=["limit", "batch_size", "task_search_path", "num_gpus", "merge_cuda",
                                        "allow_benchmark_tasks", "save_final_model", "wandb", "wandb_project",
                                        "wandb_entity", "strategy", "in_memory", "reshard", "no_report"])
    add_options(p, CommandFlags, only=["verbose"])
    add_options(p, MergeOptions, only=["quiet"])
    add_noted_flags(p, EVOLVE_NOTED_FLAGS)
    p.set_defaults(func=cmd_evolve)


def _overrides(args, ev: EvolveOptions) -> list[str]:
    out = list(args.overrides)
    if ev.backend:
        out.append(f"evaluation.backend={ev.backend}")
    if ev.limit is not None:
        out.append(f"evaluation.limit={int(ev.limit) if ev.limit >= 1 else ev.limit}")
    if ev.batch_size is not None:
        out.append(f"evaluation.batch_size={ev.batch_size}")
    if ev.merge_cuda is not None:
        out.append(f"evaluation.merge_device={'auto' if ev.merge_cuda else 'cpu'}")
    if ev.num_gpus is not None:
        out.append("evaluation.num_gpus=1")
    return out


def _notes(ev: EvolveOptions) -> None:
    notes = []
    if ev.strategy in ("buffered", "serial"):
        notes.append(f"--strategy {ev.strategy} runs as pool: each evaluator already merges the next candidate "
                     "while it scores one (evaluation.in_flight)")
    if ev.in_memory is not None:
        notes.append("--in-memory has no effect: candidates are always merged and scored in memory")
    if ev.reshard is not None:
        notes.append("--reshard has no effect: inputs are read in place and kept resident in the evaluators")
    for note in notes:
        print(f"ray-merge: note: {note}", file=sys.stderr)


def cmd_evolve(args) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from evolve.config import check_benchmark_tasks, load_config, resolve_path
    from evolve.search import RunOptions, run_search
    from ray_merge.errors import UserError

    ev = options_from_args(args, EvolveOptions)
    print_notes(args)
    _notes(ev)
    for flag, v, least in (("--workers", args.workers, 1), ("--max-fevals", ev.max_fevals, 1),
                           ("--popsize", ev.popsize, 2), ("--patience", ev.patience, 1),
                           ("--num-gpus", ev.num_gpus, 1)):
        if v is not None and v < least:
            raise UserError(f"{flag} must be at least {least}")
    for flag, v in (("--sigma0", ev.sigma0), ("--max-time", ev.max_time), ("--eval-timeout", ev.eval_timeout)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive")
    if args.workers is not None and ev.num_gpus is not None and args.workers != ev.num_gpus:
        raise UserError("--workers and --num-gpus disagree (--num-gpus N: N evaluators with a GPU each)")
    cfg = load_config(args.config, _overrides(args, ev))
    check_benchmark_tasks(cfg, ev.allow_benchmark_tasks)
    if ev.task_search_path:
        extra = [resolve_path(p, os.getcwd()) for p in ev.task_search_path]
        for p in extra:
            if not os.path.isdir(p):
                raise UserError(f"--task-search-path {p}: no such directory")
        cfg.evaluation.include_paths = cfg.evaluation.include_paths + extra
        cfg.raw["evaluation"]["include_paths"] = cfg.evaluation.include_paths
    wandb = {"project": ev.wandb_project, "entity": ev.wandb_entity} if ev.wandb else None
    opts = RunOptions(resume=args.resume, workers=args.workers or ev.num_gpus, address=args.address,
                      verbose=args.verbose, quiet=args.quiet, report=not ev.no_report, max_fevals=ev.max_fevals,
                      popsize=ev.popsize, sigma0=ev.sigma0, seed=args.random_seed, max_time_s=ev.max_time,
                      patience=ev.patience, eval_timeout_s=ev.eval_timeout, wandb=wandb,
                      allow_crimes=args.allow_crimes, save_final_model=ev.save_final_model)
    run_search(cfg, args.storage_path, opts)
    return 0
