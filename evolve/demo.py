"""The CPU demonstration of the evolutionary search, end to end.

``python -m evolve.demo [--storage-path DIR] [--resume]``: builds the demo models if needed
(evolve/demo_models.py: a tiny Llama base, an addition fine-tune and a string-reversal fine-tune),
runs ``ray-merge evolve configs/evolve/demo.yml``, then scores the input models and the best merge found on
the held-out ``*_final`` splits of the two tasks (examples the search never saw) and prints both tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# The demo never touches the hub: said before anything imports huggingface_hub, datasets or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evolve.config import load_config  # noqa: E402
from evolve.demo_eval import score_model  # noqa: E402
from evolve.demo_models import DEFAULT_OUT, ensure_demo_models  # noqa: E402
from evolve.evaluator import CandidateBuilder  # noqa: E402
from evolve.search import RunOptions, run_search  # noqa: E402
from evolve.storage import Storage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "evolve" / "demo.yml"


def final_scores(recipe: dict, tasks: list[str], limit=None) -> dict[str, float]:
    """Build ``recipe`` in memory and score it with lm-eval on ``tasks``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sd, plan = CandidateBuilder(seed=0).build(recipe)
    cfg = dict(plan.out_config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).float()
    model.load_state_dict(sd, strict=False)
    tok = AutoTokenizer.from_pretrained(plan.models[plan.donor].path)
    torch.set_num_threads(2)
    return score_model(model, tok, tasks, limit=limit, verbosity="ERROR")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage-path", default=str(REPO / "demo_out" / "evolve"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    models = ensure_demo_models(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT, seed=0)
    os.environ["RAY_MERGE_DEMO_MODELS"] = str(models)  # demo.yml reads it

    cfg = load_config(args.config, args.overrides)
    run_search(cfg, args.storage_path, RunOptions(resume=args.resume))

    st = Storage(args.storage_path)
    hist = st.read_history()
    best = json.loads(open(st.file("best.json")).read())
    search_tasks = [t.name for t in cfg.tasks]
    final_tasks = [f"{t}_final" for t in search_tasks]
    rows = {}
    for r in st.read_inputs():
        rows[r["id"].split(":", 1)[1]] = (r["scores"], r["model"])
    rows["best merge"] = (best["scores"], None)
    recipe = next(r["recipe"] for r in hist if r["id"] == best["id"])
    # the obvious merge, for comparison: task arithmetic with every task vector at weight 1
    plain = {"merge_method": cfg.genome.merge_method, "base_model": cfg.genome.base_model,
             "models": [{"model": m, "parameters": {"weight": 1.0}} for m in cfg.genome.models],
             "parameters": dict(cfg.genome.fixed)}
    rows["all weights 1"] = (None, plain)
    print(f"\nheld-out check: the input models and the best merge ({best['id']}) on the *_final splits")
    width = max(len(t) for t in search_tasks + final_tasks) + 2
    head = f"{'model':<14}" + "".join(f"{t:>{width}}" for t in search_tasks) + f"{'sum':>7}" \
        + "".join(f"{t:>{width}}" for t in final_tasks) + f"{'sum':>7}"
    print(head)
    sums = {}
    for name, (scores, path) in rows.items():
        if isinstance(path, dict):
            rec = path
        else:
            rec = recipe if path is None else {"merge_method": "passthrough", "models": [{"model": path}]}
        fin = final_scores(rec, final_tasks)
        if scores is None:
            scores = final_scores(rec, search_tasks)
        s1 = sum(scores[t] for t in search_tasks)
        s2 = sum(fin[t] for t in final_tasks)
        sums[name] = (s1, s2)
        print(f"{name:<14}" + "".join(f"{scores[t]:>{width}.3f}" for t in search_tasks) + f"{s1:>7.3f}"
              + "".join(f"{fin[t]:>{width}.3f}" for t in final_tasks) + f"{s2:>7.3f}")
    inputs = [v for k, v in sums.items() if k not in ("best merge", "all weights 1")]
    b, p1 = sums["best merge"], sums["all weights 1"]
    print(f"best merge minus best input: {b[0] - max(s for s, _ in inputs):+.3f} (search split), "
          f"{b[1] - max(f for _, f in inputs):+.3f} (held-out split); minus the all-weights-1 merge: "
          f"{b[0] - p1[0]:+.3f}, {b[1] - p1[1]:+.3f}; {len(hist)} evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
