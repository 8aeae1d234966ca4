"""`ray-merge demo`: the README's first command: a real merge end to end, no cluster, nothing downloaded.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from ray_merge.cli.plan import format_plan


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build small local models and merge them (the recipe of configs/demo.yml)")
    p.add_argument("--workdir", default="demo_out", help="where the models and the merge go (default demo_out)")
    p.add_argument("--recipe", default=None,
                   help="a recipe whose model paths start with DEMO/ (default: the built-in demo recipe)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

    text = (open(args.recipe).read() if args.recipe else DEMO_RECIPE).replace("DEMO/", models + "/")
    recipe = recipe_from_conf(OmegaConf.create(text), source=recipe_path)
    out = os.path.join(os.path.abspath(args.workdir), "merged")
    if os.path.isdir(out):
        shutil.rmtree(out)
    start = time.time()
    plan = run_merge(recipe, out, MergeOptions(random_seed=0))
    print(format_plan(plan))
    print(f"merged {len(plan.tensors)} tensors in {time.time() - start:.1f}s -> {out}")

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3 w4", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(f"loaded with transformers: {type(model).__name__}, logits {tuple(logits.shape)}, "
          f"next token after 'w1 w2 w3 w4': {tok.decode(logits[0, -1].argmax().item())!r}")
    return 0
