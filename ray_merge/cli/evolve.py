"""`ray-merge evolve`: evolutionary merge search (the search itself lives in the `evolve` package).
"""
from __future__ import annotations

import os


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolve", help="search for a good merge with CMA-ES, scoring candidates in memory with lm-eval",
        description="Evolve merge recipes: CMA-ES proposes them, Ray evaluator actors (one per GPU, or per CPU "
                    "slot) merge each in memory and score it with lm-eval (HF or vLLM backend). The config takes "
                    "mergekit-evolve's genome and tasks sections. Kill it any time; --resume continues.")
    p.add_argument("config", help="search config (YAML: genome, tasks, search, evaluation)")
    p.add_argument("--storage-path", required=True, metavar="DIR",
                   help="where the history, checkpoints, best_config.yml and the report go")
    p.add_argument("--resume", action="store_true", help="continue the search stored in --storage-path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set evaluation.limit=50 (repeatable)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="evaluator actors (default: one per GPU, else one per evaluation.num_cpus CPUs)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (auto, HOST:PORT); default: the job's cluster inside `ray job "
                        "submit`, else a local instance")
    p.add_argument("--backend", choices=("hf", "vllm"), default=None, help="evaluation backend (default: config)")
    p.add_argument("--max-fevals", type=int, default=None, help="stop after this many evaluations (default: config)")
    p.add_argument("--popsize", type=int, default=None, help="CMA-ES population size (default: config / cma)")
    p.add_argument("--sigma0", type=float, default=None, help="CMA-ES initial step, in units of each range")
    p.add_argument("--random-seed", type=int, default=None, help="seed of the search (default: config's seed)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (lm-eval's limit)")
    p.add_argument("--batch-size", default=None, help="lm-eval batch size (an integer or auto)")
    p.add_argument("--task-search-path", action="append", default=[], metavar="DIR",
                   help="more lm-eval task directories (as mergekit-evolve; repeatable)")
    p.add_argument("--no-report", action="store_true", help="skip the plots and the summary")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evolve)


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    if args.backend:
        out.append(f"evaluation.backend={args.backend}")
    if args.limit is not None:
        out.append(f"evaluation.limit={int(args.limit) if args.limit >= 1 else args.limit}")
    if args.batch_size is not None:
        out.append(f"evaluation.batch_size={args.batch_size}")
    return out


def cmd_evolve(args) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from evolve.config import load_config, resolve_path
    from evolve.search import RunOptions, run_search
    from ray_merge.errors import UserError

    for flag, v in (("--workers", args.workers), ("--max-fevals", args.max_fevals), ("--popsize", args.popsize)):
        if v is not None and v < (2 if flag == "--popsize" else 1):
            raise UserError(f"{flag} must be at least {2 if flag == '--popsize' else 1}")
    if args.sigma0 is not None and args.sigma0 <= 0:
        raise UserError("--sigma0 must be positive")
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    if args.task_search_path:
        extra = [resolve_path(p, os.getcwd()) for p in args.task_search_path]
        for p in extra:
            if not os.path.isdir(p):
                raise UserError(f"--task-search-path {p}: no such directory")
        cfg.evaluation.include_paths = cfg.evaluation.include_paths + extra
        cfg.raw["evaluation"]["include_paths"] = cfg.evaluation.include_paths
    opts = RunOptions(resume=args.resume, workers=args.workers, address=args.address, verbose=args.verbose,
                      quiet=args.quiet, report=not args.no_report, max_fevals=args.max_fevals,
                      popsize=args.popsize, sigma0=args.sigma0, seed=args.random_seed)
    run_search(cfg, args.storage_path, opts)
    return 0
