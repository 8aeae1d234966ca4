#!/usr/bin/env python3
"""Check evolve's vLLM backend against its HF backend: the same models must score the same.

Both backends are built the way an evaluator builds them (evolve.evaluator / evolve.backends): the
input models' tensors resident, each model built in memory by ray-merge's executor. The HF backend swaps
weights with ``load_state_dict``; the vLLM backend loads the first model once in a vLLM engine running in
vLLM's own venv and swaps every later one in place. Scored on the demo tasks (greedy generation, exact
match) and on a multiple-choice twin of the arithmetic task (log-likelihoods), for each input model and a
few task-arithmetic merges.

    RAY_MERGE_VLLM_PYTHON=/path/to/vllm-venv/bin/python python scripts/check_vllm_backend.py [--limit 100]

Exit status 1 when a score differs by more than --tolerance.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "configs" / "evolve" / "tasks"
sys.path.insert(0, str(REPO))

MC_TASK = """task: demo_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{[answer, (answer | int + 1) | string, (answer | int + 10) | string]}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None, help="demo models (default: $RAY_MERGE_DEMO_MODELS or "
                                                             "demo_models/, built if missing)")
    p.add_argument("--limit", type=int, default=100, help="examples per task")
    p.add_argument("--tolerance", type=float, default=0.03, help="largest allowed score difference")
    p.add_argument("--vllm-python", default=None, help="python of the vLLM venv (default $RAY_MERGE_VLLM_PYTHON)")
    args = p.parse_args(argv)

    import logging

    import torch

    torch.set_num_threads(2)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evolve.backends.hf import HFBackend
    from evolve.backends.vllm import VLLMBackend
    from evolve.evaluator import CandidateBuilder

    models = args.models
    if models is None:
        from evolve.demo_models import DEFAULT_OUT, ensure_demo_models

        models = ensure_demo_models(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT, seed=0,
                                    log=lambda *a: None)
    models = Path(models)
    extra = Path(tempfile.mkdtemp(prefix="rm-vcheck-"))
    (extra / "demo_arith_mc.yaml").write_text(MC_TASK.format(data=TASK_DIR / "data" / "arith_search.jsonl"))
    tasks = [{"name": "demo_arith", "metric": "exact_match,none", "weight": 1.0},
             {"name": "demo_reverse", "metric": "exact_match,none", "weight": 1.0},
             {"name": "demo_arith_mc", "metric": "acc,none", "weight": 1.0}]
    ev = {"limit": args.limit, "batch_size": 64, "include_paths": [str(TASK_DIR), str(extra)], "dtype": "float32",
          "model_args": {"add_bos_token": True}, "num_cpus": 2, "device": "cpu", "lm_eval": {},
          "vllm_python": args.vllm_python}

    def task_arith(wa: float, wr: float) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": str(models / "base"),
                "models": [{"model": str(models / "ft_arith"), "parameters": {"weight": wa}},
                           {"model": str(models / "ft_reverse"), "parameters": {"weight": wr}}]}

    candidates = {name: {"merge_method": "passthrough", "models": [{"model": str(models / name)}]}
                  for name in ("base", "ft_arith", "ft_reverse")}
    candidates.update({"task_arith 1.0/1.0": task_arith(1.0, 1.0), "task_arith 0.7/0.9": task_arith(0.7, 0.9),
                       "task_arith 0.5/0.5": task_arith(0.5, 0.5)})
    builder = CandidateBuilder(seed=0)
    sds = {name: builder.build(r) for name, r in candidates.items()}
    first_sd, plan = sds["base"]

    t0 = time.time()
    vllm = VLLMBackend(ev, tasks, plan, first_sd, tempfile.mkdtemp(prefix="rm-vcheck-v-"))
    print(f"vLLM {vllm.info['vllm']} engine ready in {time.time() - t0:.1f}s (worker pid {vllm.info['pid']})",
          flush=True)
    hf = HFBackend(ev, tasks, plan, first_sd, tempfile.mkdtemp(prefix="rm-vcheck-h-"))
    names = [t["name"] for t in tasks]
    print(f"{'model':<20} {'backend':<7}" + "".join(f"{n:>15}" for n in names) + f"{'swap s':>8}{'score s':>9}")
    worst = 0.0
    try:
        for name, (sd, _) in sds.items():
            row = {}
            for label, backend in (("hf", hf), ("vllm", vllm)):
                t0 = time.time()
                backend.load(sd)
                t1 = time.time()
                row[label] = backend.score()
                t2 = time.time()
                print(f"{name:<20} {label:<7}" + "".join(f"{row[label][n]:>15.3f}" for n in names)
                      + f"{t1 - t0:>8.2f}{t2 - t1:>9.2f}", flush=True)
            worst = max(worst, *(abs(row["hf"][n] - row["vllm"][n]) for n in names))
    finally:
        vllm.close()
    ok = worst <= args.tolerance
    print(f"largest difference between the backends: {worst:.4f} (tolerance {args.tolerance}): "
          f"{'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM's engine processes are spawned: keep the import side-effect free
    sys.exit(main())
