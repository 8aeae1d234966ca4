"""The honest evolution benchmark: an evolved merge against the inputs and hand-written merges, on held-out data.

``python -m evolve.bench [--seed 0] [--quick] [--build-only]``:

1. builds (or reuses) the benchmark models (evolve/bench_models.py: a broadly pretrained char-level Llama and
   two plain fine-tunes of it, one on additions, one on string reversal);
2. scores the base, each fine-tune and hand-written merges: ``linear``, ``task_arithmetic`` (weights 1 and
   0.5), ``ties`` and ``dare_ties`` at mergekit's defaults (weight 1, density 1; ties normalizes, dare_ties
   rescales) and on a grid of weight {0.5, 1} x density {0.5, 0.7, 1} (for ties with normalize off, since
   a normalized merge of equally weighted models does not depend on the weight, plus density {0.5, 0.7}
   normalized);
3. runs the evolutionary search of configs/evolve/bench/honest.yml (CMA-ES on the search splits, through
   ``evolve.search.run_search`` as ``ray-merge evolve`` does);
4. prints one table: every model on the search split (where choices are made) and on the held-out final
   split (reported only; 400 examples per task), with the evaluations and wall time each took.

"Best hand-written" is the hand-written merge with the best search-split score -- chosen the way the search
chooses its best -- and the verdict compares the evolved merge with it and with the best input on the
held-out split.  Results (and the search's storage) go to ``--storage-path`` (default bench_models_out/seed<N>/).
Everything is deterministic given the seed and the thread count, except the wall times.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

# The benchmark never touches the hub: said before anything imports huggingface_hub, datasets or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' progress bars, once per model scored

import torch

from evolve.bench_models import ENV_VAR, FINETUNES, ensure_bench_models
from evolve.bench_models import default_out as default_models
from evolve.config import load_config
from evolve.demo_eval import score_model
from evolve.evaluator import CandidateBuilder
from evolve.search import RunOptions, run_search
from evolve.storage import Storage

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "configs" / "evolve" / "bench"
CONFIG = BENCH_DIR / "honest.yml"
TASK_DIR = BENCH_DIR / "tasks"
SEARCH_TASKS = ("bench_add", "bench_rev")
FINAL_TASKS = ("bench_add_final", "bench_rev_final")
QUICK_FEVALS = 32


def models_dir_for(seed: int) -> Path:
    """Seed 0: $RAY_MERGE_BENCH_MODELS or bench_models/; seed N: a sibling ``<that>_seed<N>``."""
    out = default_models()
    return out if seed == 0 else out.with_name(f"{out.name}_seed{seed}")


def hand_written(models: Path) -> list[tuple[str, dict]]:
    """(label, recipe) of each hand-written merge of the two fine-tunes."""
    base = str(models / "base")
    fts = [str(models / n) for n in FINETUNES]

    def recipe(method: str, weight: float, density=None, **params) -> dict:
        mp = {"weight": weight} if density is None else {"weight": weight, "density": density}
        r = {"merge_method": method, "models": [{"model": m, "parameters": dict(mp)} for m in fts],
             "parameters": params, "dtype": "float32"}
        if method != "linear":
            r["base_model"] = base
        return r

    out = [("linear (average)", recipe("linear", 1.0)),
           ("task_arithmetic w1", recipe("task_arithmetic", 1.0)),
           ("task_arithmetic w0.5", recipe("task_arithmetic", 0.5))]
    # ties normalizes by default (then equal weights all give the same merge): density alone, then the
    # weight x density grid without normalize; dare_ties does not normalize by default: the grid as is
    out += [(f"ties d{d:g}" + (" (defaults)" if d == 1 else ""), recipe("ties", 1.0, d)) for d in (1.0, 0.5, 0.7)]
    out += [(f"ties w{w:g} d{d:g} no normalize", recipe("ties", w, d, normalize=False))
            for w in (0.5, 1.0) for d in (0.5, 0.7, 1.0)]
    out += [(f"dare_ties w{w:g} d{d:g}" + (" (defaults)" if w == d == 1 else ""), recipe("dare_ties", w, d))
            for w in (1.0, 0.5) for d in (1.0, 0.5, 0.7)]
    return out


class Scorer:
    """Builds recipes in memory (ray-merge's merge code, as the evaluators do) and scores them with lm-eval."""

    def __init__(self, models: Path, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.builder = CandidateBuilder(seed=seed)
        self.tok = AutoTokenizer.from_pretrained(models / "base")
        self.model = AutoModelForCausalLM.from_pretrained(models / "base", dtype=torch.float32)
        self.seed = seed
        self.models = models

    def score(self, recipe: dict, tasks=SEARCH_TASKS + FINAL_TASKS, limit=None) -> dict[str, float]:
        sd, _plan = self.builder.build(recipe)
        self.model.load_state_dict(sd, strict=False)
        return score_model(self.model, self.tok, tasks, limit=limit, include_path=TASK_DIR, verbosity="ERROR",
                           random_seed=self.seed)

    def score_input(self, name: str, **kw) -> dict[str, float]:
        return self.score({"merge_method": "passthrough", "models": [{"model": str(self.models / name)}],
                           "dtype": "float32"}, **kw)


def row(name: str, scores: dict, evals: int, wall_s: float, **extra) -> dict:
    return {"name": name, "scores": scores, "search": sum(scores[t] for t in SEARCH_TASKS),
            "final": sum(scores[t] for t in FINAL_TASKS), "evaluations": evals, "wall_s": round(wall_s, 1), **extra}


def run_evolution(models: Path, seed: int, storage: Path, max_fevals=None, workers=None, say=print) -> dict:
    """The search of configs/evolve/bench/honest.yml on ``models``; returns its best record and timings."""
    os.environ[ENV_VAR] = str(models)  # honest.yml reads it
    overrides = [f"seed={seed}", f"search.seed={seed}"]
    if max_fevals:
        overrides.append(f"search.max_fevals={max_fevals}")
    if workers:
        overrides.append(f"evaluation.workers={workers}")
    cfg = load_config(str(CONFIG), overrides)
    if storage.exists():
        shutil.rmtree(storage)
    t0 = time.time()
    summary = run_search(cfg, str(storage), RunOptions(quiet=True, report=False))
    wall = time.time() - t0
    hist = [r for r in Storage(str(storage)).read_history() if r["status"] == "ok"]
    # ties are common (exact match on 400 examples): the earliest candidate wins, whichever evaluator
    # finished first, so the pick does not depend on timing
    best = max(hist, key=lambda r: (r["score"], -r["generation"], -r["index"]))
    say(f"search: {len(hist)} evaluations in {wall:.0f}s ({summary.get('stop_reason')}); best {best['id']} "
        f"{best['score']:.3f} on the search split")
    return {"best": best, "evaluations": len(hist), "wall_s": wall, "first_best_eval": sorted(
        hist, key=lambda r: (r["generation"], r["index"])).index(best) + 1}


def fmt_table(rows: list[dict]) -> str:
    head = ("| model | evaluations | wall s | search add | search rev | search sum | held-out add | held-out rev "
            "| **held-out sum** |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['name']} | {r['evaluations']} | {r['wall_s']:.0f} | {s['bench_add']:.3f} | "
                     f"{s['bench_rev']:.3f} | {r['search']:.3f} | {s['bench_add_final']:.3f} | "
                     f"{s['bench_rev_final']:.3f} | {r['final']:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    inputs = [by[n] for n in ("base",) + FINETUNES]
    hand = [r for r in rows if r.get("kind") == "hand"]
    evolved = by["evolved (CMA-ES)"]
    best_input = max(inputs, key=lambda r: r["final"])
    best_hand = max(hand, key=lambda r: r["search"])  # chosen on the search split, like the search's best
    oracle_hand = max(hand, key=lambda r: r["final"])  # the best on held-out data: what no one could pick
    return {
        "best_input": best_input["name"], "best_input_final": best_input["final"],
        "best_hand": best_hand["name"], "best_hand_final": best_hand["final"],
        "oracle_hand": oracle_hand["name"], "oracle_hand_final": oracle_hand["final"],
        "evolved_final": evolved["final"],
        "evolved_minus_best_input": round(evolved["final"] - best_input["final"], 4),
        "evolved_minus_best_hand": round(evolved["final"] - best_hand["final"], 4),
        "evolved_minus_oracle_hand": round(evolved["final"] - oracle_hand["final"], 4),
    }


def run(seed: int, storage: Path, quick: bool = False, workers=None, say=print) -> dict:
    models = ensure_bench_models(models_dir_for(seed), seed=seed, log=say)
    torch.set_num_threads(1)  # tiny matrices; more threads crawl when the cores are shared
    scorer = Scorer(models, seed)
    rows = []
    for name in ("base",) + FINETUNES:
        t0 = time.time()
        sc = scorer.score_input(name)
        rows.append(row(name, sc, 1, time.time() - t0, kind="input"))
        say(f"{name}: search {rows[-1]['search']:.3f} held-out {rows[-1]['final']:.3f}")
    for name, recipe in hand_written(models):
        t0 = time.time()
        sc = scorer.score(recipe)
        rows.append(row(name, sc, 1, time.time() - t0, kind="hand", recipe=recipe))
        say(f"{name}: search {rows[-1]['search']:.3f} held-out {rows[-1]['final']:.3f}")
    ev = run_evolution(models, seed, storage / "search", QUICK_FEVALS if quick else None, workers, say)
    t0 = time.time()
    sc = scorer.score(ev["best"]["recipe"])
    rows.append(row("evolved (CMA-ES)", sc, ev["evaluations"], ev["wall_s"] + time.time() - t0, kind="evolved",
                    recipe=ev["best"]["recipe"], first_best_eval=ev["first_best_eval"], id=ev["best"]["id"]))
    manifest = json.loads((models / "manifest.json").read_text())
    result = {"seed": seed, "quick": quick, "models": str(models), "model_manifest": manifest, "rows": rows,
              "verdict": verdict(rows), "cpus": os.cpu_count()}
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "bench.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="seed of the models and the search (repeat for several; default 0)")
    p.add_argument("--quick", action="store_true", help=f"a {QUICK_FEVALS}-evaluation search")
    p.add_argument("--build-only", action="store_true", help="only build (or check) the models")
    p.add_argument("--out", type=Path, default=None, help=f"models directory (seed 0; default ${ENV_VAR} or "
                                                          "bench_models/)")
    p.add_argument("--storage-path", type=Path, default=REPO / "bench_models_out",
                   help="results and the searches' storage (default bench_models_out/)")
    p.add_argument("--workers", type=int, default=None, help="evaluators of the search (default: the config's 2)")
    args = p.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.out is not None:
        os.environ[ENV_VAR] = str(args.out.resolve())
    seeds = args.seed or [0]
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.build_only:
        for seed in seeds:
            ensure_bench_models(models_dir_for(seed), seed=seed, log=say)
        return 0
    results = [run(seed, args.storage_path / f"seed{seed}", args.quick, args.workers, say) for seed in seeds]
    for res in results:
        v = res["verdict"]
        print(f"\nseed {res['seed']}: exact match, search split 200 + held-out split 400 examples per task"
              f"{' (--quick)' if res['quick'] else ''}")
        print(fmt_table(res["rows"]))
        print(f"evolved minus best input ({v['best_input']}): {v['evolved_minus_best_input']:+.3f} held-out; "
              f"minus best hand-written chosen on the search split ({v['best_hand']}): "
              f"{v['evolved_minus_best_hand']:+.3f}; minus the best hand-written on held-out data "
              f"({v['oracle_hand']}): {v['evolved_minus_oracle_hand']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
