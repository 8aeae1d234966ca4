"""Data-flow search (evolve.dataflow): genes -> layer path -> slices recipe, without Ray; the padded candidate
the evaluators build scores as the recipe; and a tiny search whose best_config.yml `ray-merge run` merges."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

from evolve.config import config_from_dict
from evolve.dataflow import DataflowGenome, PathLayer
from ray_merge.errors import UserError
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "configs" / "evolve" / "tasks"
TASKS = [{"name": "demo_arith", "metric": "exact_match,none"}]


@pytest.fixture(scope="module")
def demo_models() -> Path:
    from evolve.demo_models import DEFAULT_OUT, ensure_demo_models

    out = Path(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT)
    return ensure_demo_models(out, seed=0, log=lambda *_: None)


def genome_dict(models: Path, **dataflow) -> dict:
    return {"kind": "dataflow", "models": [str(models / "ft_arith"), str(models / "ft_reverse")],
            "dtype": "float32", "dataflow": dataflow}


def make(models: Path, **dataflow) -> DataflowGenome:
    cfg = config_from_dict({"genome": genome_dict(models, **dataflow), "tasks": TASKS})
    return DataflowGenome.from_config(cfg.genome)


def layers_of(recipe: dict) -> list[tuple[str, int]]:
    return [(sl["sources"][0]["model"], i) for sl in recipe["slices"] for i in range(*sl["sources"][0]["layer_range"])]


def test_genes_path_recipe(demo_models):
    g = make(demo_models, max_layers=6, repeats=2, scale={"min": 0.5, "max": 1.5})
    n = 2 * 2 * 4  # repeats x models x layers
    assert g.dim == 2 * n and len(g.slots) == n
    a, b = g.cfg.models
    # the start: the first model, as it is
    assert g.to_recipe(g.initial()) == {"merge_method": "passthrough", "dtype": "float32",
                                        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]}]}
    # hand-made genes: A1 A2 (scale 1), B3 (scale 0.5), then A0 of the second repetition (scale 1.5)
    x = np.full(g.dim, 0.5)
    x[:n] = 0.0
    for t, u in ((1, 0.5), (2, 0.5), (4 + 3, 0.0), (8 + 0, 1.0)):
        x[t], x[n + t] = 0.9, u
    assert g.path(x) == [PathLayer(0, 1, 1.0), PathLayer(0, 2, 1.0), PathLayer(1, 3, 0.5), PathLayer(0, 0, 1.5)]
    recipe = g.to_recipe(x)
    half = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}, {"value": 1.0}]
    assert recipe["slices"][:2] == [{"sources": [{"model": a, "layer_range": [1, 3]}]},
                                    {"sources": [{"model": b, "layer_range": [3, 4],
                                                  "parameters": {"scale": half}}]}]
    assert recipe["slices"][2]["sources"][0]["parameters"]["scale"][0]["value"] == 1.5
    assert g.to_recipe(x.copy()) == recipe  # deterministic
    # the planner takes it: 4 layers from two models, config rewritten
    plan = plan_recipe(recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe)), source="<df>"), seed=0)
    assert plan.out_config["num_hidden_layers"] == 4
    # nothing included: the most strongly included candidate alone
    x2 = np.zeros(g.dim)
    x2[5] = 0.3
    assert g.path(x2) == [PathLayer(1, 1, 0.5)]


def test_random_genotypes_respect_max_layers_and_scale_bounds(demo_models):
    g = make(demo_models, max_layers=5, scale={"min": 0.25, "max": 1.25})
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(size=g.dim)
        path = g.path(x)
        assert 1 <= len(path) <= 5
        assert all(0.25 <= p.scale <= 1.25 for p in path)
        n = len(g.slots)
        inc = [t for t in range(n) if x[t] > 0.5]
        if len(inc) > 5:  # the most strongly included, still in sequence order
            keep = sorted(sorted(inc, key=lambda t: -x[t])[:5])
            assert path == [PathLayer(g.slots[t].model, g.slots[t].layer, g.scale_of(x[n + t])) for t in keep]
        recipe = g.to_recipe(x)
        assert len(layers_of(recipe)) == len(path)
        padded = g.for_evaluator(recipe)
        assert len(layers_of(padded)) == 5 and padded["slices"][:len(recipe["slices"])] == recipe["slices"]


def test_fixed_scale_and_defaults(demo_models):
    g = make(demo_models, scale=1.0)
    assert g.dim == 2 * 2 * 4 and g.max_layers == 8  # include genes only; default max_layers: twice 4
    x = np.random.default_rng(3).uniform(size=g.dim)
    assert all(p.scale == 1.0 for p in g.path(x))
    assert all("parameters" not in sl["sources"][0] for sl in g.to_recipe(x)["slices"])


@pytest.mark.parametrize("genome, key", [
    ({"kind": "mixed"}, "genome.kind"),
    ({"base_model": "ft_arith"}, "genome.base_model"),
    ({"merge_method": "ties"}, "genome.merge_method"),
    ({"layer_granularity": 2}, "genome.layer_granularity"),
    ({"dataflow": {"repeats": 0}}, "genome.dataflow.repeats"),
    ({"dataflow": {"scale": {"min": 1.0, "max": 0.5}}}, "genome.dataflow.scale"),
    ({"dataflow": {"bogus": 1}}, "genome.dataflow.bogus"),
    ({"kind": "parameters", "merge_method": "linear", "dataflow": {}}, "genome.dataflow"),
])
def test_config_errors(demo_models, genome, key):
    spec = dict(genome_dict(demo_models), **genome)
    with pytest.raises(UserError) as e:
        config_from_dict({"genome": spec, "tasks": TASKS}, source="s.yml")
    assert e.value.key == key


def test_genome_errors(demo_models):
    with pytest.raises(UserError, match="below the 4 layers") as e:
        make(demo_models, max_layers=3)
    assert e.value.key == "genome.dataflow.max_layers"
    with pytest.raises(UserError, match="c_proj") as e:
        make(demo_models, scale_filters=["c_proj"])
    assert e.value.key == "genome.dataflow.scale_filters"


def test_padded_candidate_scores_as_the_recipe(demo_models):
    """The evaluators build paths padded to max_layers with identity layers: the same logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evolve.evaluator import CandidateBuilder

    g = make(demo_models, max_layers=8)
    x = np.random.default_rng(7).uniform(size=g.dim)
    recipe = g.to_recipe(x)
    builder = CandidateBuilder(seed=0)
    logits = []
    for r in (recipe, g.for_evaluator(recipe)):
        sd, plan = builder.build(r)
        cfg = dict(plan.out_config)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not missing and not unexpected
        with torch.no_grad():
            logits.append(model(torch.tensor([[1, 5, 9, 12, 7, 3]])).logits)
    assert plan.out_config["num_hidden_layers"] == 8
    assert torch.equal(logits[0], logits[1])


@pytest.mark.slow
def test_tiny_dataflow_search_writes_a_runnable_slices_recipe(demo_models, tmp_path):
    conf = {
        "name": "dataflow-test",
        "genome": genome_dict(demo_models, max_layers=6, repeats=1),
        "tasks": [{"name": "demo_arith", "metric": "exact_match,none"},
                  {"name": "demo_reverse", "metric": "exact_match,none"}],
        "search": {"popsize": 4, "max_fevals": 4, "seed": 0, "sigma0": 0.3},
        "evaluation": {"limit": 8, "batch_size": 64, "include_paths": [str(TASK_DIR)], "workers": 1,
                       "model_args": {"add_bos_token": True}, "score_inputs": True},
    }
    cfg = tmp_path / "df.yml"
    cfg.write_text(yaml.safe_dump(conf))
    store = tmp_path / "store"
    env = {"RAY_TMPDIR": "/tmp", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("evolve", cfg, "--storage-path", store, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (store / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(r["status"] == "ok" for r in history), history
    inputs = [json.loads(line) for line in (store / "inputs.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in inputs) == ["ok", "ok"]  # scored padded to 6 layers
    best = yaml.safe_load((store / "best_config.yml").read_text())
    assert best["merge_method"] == "passthrough" and best["slices"]
    depth = len(layers_of(best))
    assert 1 <= depth <= 6

    out = tmp_path / "merged"
    proc = run_cli("run", store / "best_config.yml", out, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == depth
