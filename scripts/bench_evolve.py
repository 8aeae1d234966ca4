#!/usr/bin/env python3
"""Benchmark the evolutionary search's evaluators: throughput and how busy they are.

Runs short searches with N evaluator actors (HF backend, or --backend vllm) on the CPU demo's models
(``--benchmark demo``: configs/evolve/demo.yml's genome and tasks) or on the honest benchmark's
(``--benchmark honest``: configs/evolve/bench/honest.yml, models from evolve/bench_models.py, a 1.5M-parameter
model, 2.3x the demo's) and reports, per run:

- candidates per minute: over the whole run (Ray and evaluator start-up included) and in steady state
  (from the first candidate's scoring to the last one's);
- per evaluator: the share of its time spent scoring candidates (weights swapped in, lm-eval running),
  from its first scoring start to its last scoring end — the rest is waiting for a candidate to be merged or
  for the next generation (CMA-ES needs every result of a generation before it proposes the next);
- mean merge (build) and scoring time per candidate.

By default two runs: ``in_flight: 1`` (an evaluator gets its next candidate only when it has finished the
previous one: merging is not overlapped) and ``in_flight: 2`` (the default: the next candidate is merged
while the current one is scored).

    python scripts/bench_evolve.py [--benchmark demo|honest] [--workers 2] [--popsize 8] [--max-fevals 32]
                                   [--limit 200]

mergekit-evolve is not run side by side: its evaluation actors ask Ray for a whole GPU each
(``@ray.remote(num_cpus=1, num_gpus=1.0)`` in mergekit/evo/actors.py), so on a machine without GPUs they are
never scheduled, and its side venv here has neither lm-eval nor Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# benchmark -> (its search config, its fine-tunes' directory names)
BENCHMARKS = {
    "demo": (REPO / "configs" / "evolve" / "demo.yml", ("ft_arith", "ft_reverse")),
    "honest": (REPO / "configs" / "evolve" / "bench" / "honest.yml", ("ft_add", "ft_rev")),
}


def run_once(models: Path, workers: int, popsize: int, max_fevals: int, limit: int, in_flight: int,
             seed: int, backend: str = "hf", benchmark: str = "demo") -> dict:
    from evolve.config import load_config
    from evolve.report import worker_utilisation
    from evolve.search import RunOptions, run_search
    from evolve.storage import Storage

    store = Path(tempfile.mkdtemp(prefix="rm-bench-evolve-"))
    config, finetunes = BENCHMARKS[benchmark]
    cfg = load_config(str(config),
                      [f"genome.models=[{','.join(str(models / f) for f in finetunes)}]",
                       f"genome.base_model={models / 'base'}",
                       f"evaluation.limit={limit}", f"evaluation.workers={workers}",
                       f"evaluation.in_flight={in_flight}", "evaluation.score_inputs=false",
                       f"evaluation.backend={backend}",
                       f"search.popsize={popsize}", f"search.max_fevals={max_fevals}", f"search.seed={seed}"])
    t0 = time.time()
    summary = run_search(cfg, str(store), RunOptions(quiet=True, report=False))
    wall = time.time() - t0
    hist = Storage(str(store)).read_history()
    util = worker_utilisation(hist, summary["session"])
    first = min(w["first"] for w in util.values())
    last = max(w["last"] for w in util.values())
    n = len(hist)
    ok = [r for r in hist if r["status"] == "ok"]
    out = {
        "benchmark": benchmark, "backend": backend, "in_flight": in_flight, "workers": workers, "evaluations": n, "wall_s": wall,
        "setup_s": max(i["setup_s"] for i in summary["workers"]),
        "per_min_total": 60 * n / wall, "per_min_steady": 60 * n / (last - first),
        "share": {k: v["share"] for k, v in sorted(util.items())},
        "build_s": statistics.mean(r["timings"]["build_s"] for r in ok),
        "eval_s": statistics.mean(r["timings"]["eval_s"] for r in ok),
        "best": max(r["score"] for r in ok), "storage": str(store),
    }
    with open(store / "bench.json", "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="demo",
                   help="demo: the CPU demo's models; honest: the honest benchmark's (evolve/bench_models.py)")
    p.add_argument("--models", type=Path, default=None,
                   help="the models (default: $RAY_MERGE_DEMO_MODELS or demo_models/ for demo, "
                        "$RAY_MERGE_BENCH_MODELS or bench_models/ for honest; built if missing)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--max-fevals", type=int, default=32)
    p.add_argument("--limit", type=int, default=200, help="examples per task (200: all, as the demo)")
    p.add_argument("--in-flight", default="1,2", help="comma-separated in_flight settings to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="vllm: needs $RAY_MERGE_VLLM_PYTHON (see evolve/backends/vllm.py)")
    args = p.parse_args(argv)

    models = args.models
    if models is None and args.benchmark == "honest":
        from evolve.bench_models import ensure_bench_models

        models = ensure_bench_models(seed=0, log=lambda *a: None)
    elif models is None:
        from evolve.demo_models import DEFAULT_OUT, ensure_demo_models

        models = ensure_demo_models(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT, seed=0,
                                    log=lambda *a: None)
    rows = []
    for k in [int(v) for v in args.in_flight.split(",")]:
        r = run_once(Path(models), args.workers, args.popsize, args.max_fevals, args.limit, k, args.seed,
                     args.backend, args.benchmark)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"{args.benchmark} search, {args.workers} evaluators ({args.backend} backend, 1 CPU each), popsize {args.popsize}, "
          f"{args.max_fevals} evaluations, limit {args.limit} examples per task, {os.cpu_count()} cores")
    print(f"{'in_flight':>9} {'cand/min':>9} {'steady':>8} {'start-up':>9} {'merge s':>8} {'score s':>8}  "
          f"busy scoring (per evaluator)")
    for r in rows:
        shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items())
        print(f"{r['in_flight']:>9} {r['per_min_total']:>9.1f} {r['per_min_steady']:>8.1f} {r['setup_s']:>8.1f}s "
              f"{r['build_s']:>8.3f} {r['eval_s']:>8.3f}  {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
