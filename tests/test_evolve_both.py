"""``genome.kind: both`` (evolve.both): a parameter-space merge and a layer path over it and the inputs.

Config checks; the two-stage recipe of a gene vector; the evaluators' in-memory two-stage build equals what
``ray-merge multi`` writes for the same recipe; and short searches (Ray, with the stand-in evaluator of
tests/evolve_fake.py) whose best_config.yml ``ray-merge multi`` runs, interrupted and resumed exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_dir, local_ray, run_cli
from evolve_fake import FakeEvaluator, comparable, use_by_value

from evolve.both import BothGenome
from evolve.config import BOTH_STAGE, config_from_dict
from evolve.dataflow import DataflowGene
from evolve.stages import plan_stages, recipe_yaml
from evolve.storage import Storage
from ray_merge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TASKS = [{"name": "task_a", "metric": "acc,none"}, {"name": "task_b", "metric": "acc,none"}]
ENV = {"RAY_TMPDIR": "/tmp", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from models import make_family

    root = tmp_path_factory.mktemp("bothfam")
    make_family(str(root), "llama", n_finetunes=2, seed=5, hidden=32, layers=4, intermediate=64, heads=2,
                kv_heads=1)
    return {"base": str(root / "llama_base"), "a": str(root / "llama_ft0"), "b": str(root / "llama_ft1")}


@pytest.fixture(scope="module")
def ray_cluster():
    use_by_value()
    with local_ray("rmb") as ray:
        yield ray.get_runtime_context().gcs_address


def genome_dict(fam, **extra) -> dict:
    g = {"kind": "both", "models": [fam["a"], fam["b"]], "base_model": fam["base"],
         "merge_method": "ties", "dtype": "float32",
         "dataflow": {"max_layers": 6, "repeats": 1, "scale": {"min": 0.5, "max": 1.5}}}
    g.update(extra)
    return g


def make(models, **extra) -> BothGenome:
    cfg = config_from_dict({"genome": genome_dict(models, **extra), "tasks": TASKS})
    return BothGenome.from_config(cfg.genome)


def path_of(recipe: dict) -> list[tuple[str, int]]:
    return [(sl["sources"][0]["model"], i) for sl in recipe["slices"] for i in range(*sl["sources"][0]["layer_range"])]


def genotype(g: BothGenome, layers: list[tuple[int, int, float]], seed: int = 0) -> np.ndarray:
    """Random merge genes; a path of (source, layer, scale gene) with source 0 the merged model."""
    x = np.random.default_rng(seed).uniform(size=g.dim)
    n = len(g.flow.slots)
    x[g.split:g.split + n] = 0.1
    for m, i, u in layers:
        t = next(k for k, s in enumerate(g.flow.slots) if (s.model, s.layer) == (m, i))
        x[g.split + t], x[g.split + n + t] = 0.9, u
    return x


# ------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------
def test_config_accepts_both(models):
    cfg = config_from_dict({"genome": genome_dict(models, dataflow=None), "tasks": TASKS})
    g = cfg.genome
    assert g.kind == "both" and g.merge_method == "ties" and g.base_model == models["base"]
    assert g.dataflow is not None and g.dataflow.repeats == 2 and g.dataflow.scale_filters == ["o_proj", "down_proj"]
    assert g.fixed == {"normalize": True}  # the parameter genome's defaults still apply


@pytest.mark.parametrize("extra, key", [
    ({"tokenizer_source": "union"}, "genome.tokenizer_source"),
    ({"tokenizer": {"source": "base"}}, "genome.tokenizer"),
    ({"models": ["merged", "x"]}, "genome.models"),
    ({"base_model": "merged"}, "genome.base_model"),
    ({"merge_method": None}, "genome.merge_method"),
    ({"merge_method": "passthrough"}, "genome.merge_method"),
    ({"dataflow": {"repeats": 0}}, "genome.dataflow.repeats"),
    ({"dataflow": {"bogus": 1}}, "genome.dataflow.bogus"),
    ({"dataflow": {"scale": {"min": 2.0, "max": 1.0}}}, "genome.dataflow.scale"),
    ({"kind": "layers"}, "genome.kind"),
    ({"kind": "parameters"}, "genome.dataflow"),
])
def test_config_errors(models, extra, key):
    spec = genome_dict(models, **extra)
    if extra.get("merge_method", "x") is None:
        del spec["merge_method"]
    with pytest.raises(UserError) as e:
        config_from_dict({"genome": spec, "tasks": TASKS}, source="s.yml")
    assert e.value.key == key
    assert "\n" not in str(e.value)


def test_genome_errors(models):
    with pytest.raises(UserError, match="below the 4 layers") as e:
        make(models, dataflow={"max_layers": 3})
    assert e.value.key == "genome.dataflow.max_layers"
    with pytest.raises(UserError, match="c_proj") as e:
        make(models, dataflow={"scale_filters": ["c_proj"]})
    assert e.value.key == "genome.dataflow.scale_filters"


# ------------------------------------------------------------------------------------------------------------
# genes -> two-stage recipe
# ------------------------------------------------------------------------------------------------------------
def test_two_stage_recipe_from_genes(models):
    g = make(models)
    a, b = models["a"], models["b"]
    # the parameter genes (ties: weight and density per model) and the path's (3 sources x 4 layers, include
    # and scale)
    assert g.split == g.params.dim == 4 and g.dim == 4 + 2 * 12
    assert [s.model for s in g.flow.slots] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(isinstance(gene, DataflowGene) for gene in g.genes[4:])
    assert g.gene_label(g.genes[4]) == "include · merged · layer 0"

    # the start: the parameter genome's start, then the merged model as it is
    stage1, stage2 = g.to_recipe(g.initial())
    assert stage1 == {"name": BOTH_STAGE, **g.params.to_recipe(g.params.initial())}
    assert stage1["merge_method"] == "ties" and stage1["base_model"] == models["base"]
    assert stage2 == {"merge_method": "passthrough", "dtype": "float32",
                      "slices": [{"sources": [{"model": BOTH_STAGE, "layer_range": [0, 4]}]}]}

    # merged 0-1, merged 3 at scale 1.5, a's layer 2 at scale 0.5 (in sequence order: model after model)
    x = genotype(g, [(0, 0, 0.5), (0, 1, 0.5), (1, 2, 0.0), (0, 3, 1.0)])
    recipe = g.to_recipe(x)
    assert recipe[0] == {"name": BOTH_STAGE, **g.params.to_recipe(x[:4])}
    w = recipe[0]["models"][0]["parameters"]
    assert w == {"weight": pytest.approx(x[0]), "density": pytest.approx(x[2])}
    assert path_of(recipe[1]) == [(BOTH_STAGE, 0), (BOTH_STAGE, 1), (BOTH_STAGE, 3), (a, 2)]
    scales = [sl["sources"][0].get("parameters", {}).get("scale", [{"value": 1.0}])[0]["value"]
              for sl in recipe[1]["slices"]]
    assert scales == [1.0, 1.5, 0.5]
    assert g.to_recipe(x.copy()) == recipe  # deterministic
    assert yaml.safe_load_all(recipe_yaml(recipe)).__next__()["name"] == BOTH_STAGE

    # the evaluators' recipe: the path padded to max_layers (6) with identity layers of its last model
    padded = g.for_evaluator(recipe)
    assert padded[0] == recipe[0] and len(path_of(padded[1])) == 6
    assert padded[1]["slices"][-1]["sources"][0]["model"] == a
    assert padded[1]["slices"][-1]["sources"][0]["parameters"]["scale"][0]["value"] == 0.0
    # an input model, as the search scores it
    inp = g.for_evaluator({"merge_method": "passthrough", "models": [{"model": b}]})
    assert path_of(inp) == [(b, i) for i in range(4)] + [(b, 0), (b, 1)]

    # both stages plan, the second from the first's plan alone (nothing on disk)
    plans = plan_stages(padded, source="<both>", seed=0)
    assert [n for n, _ in plans] == [BOTH_STAGE, None]
    assert plans[1][1].models[0].ref == BOTH_STAGE and plans[1][1].out_config["num_hidden_layers"] == 6
    # a path without the merged model's layers: stage 1 is not planned (nor merged)
    only_inputs = g.to_recipe(genotype(g, [(1, 0, 0.5), (2, 1, 0.5)]))
    assert path_of(only_inputs[1]) == [(a, 0), (b, 1)]
    assert [n for n, _ in plan_stages(only_inputs, source="<both>", seed=0)] == [None]


def test_report_table_and_description(models):
    g = make(models)
    x = genotype(g, [(0, 0, 0.5), (1, 2, 0.5)])
    labels, table = g.layer_table(x)
    assert table.shape == (len(labels), 6)
    assert labels[0].startswith(f"{BOTH_STAGE}: ") and labels[-1] == "scale"
    assert np.isnan(table[0, 4:]).all()  # the merge has 4 layers, the path up to 6
    assert "stage 1" in g.describe() and f"{g.dim} genes" in g.describe()


# ------------------------------------------------------------------------------------------------------------
# the in-memory build equals the written recipe run with `ray-merge multi`
# ------------------------------------------------------------------------------------------------------------
def test_in_memory_build_equals_multi_cli(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from evolve.evaluator import CandidateBuilder

    g = make(models)
    x = genotype(g, [(0, 0, 0.0), (0, 1, 0.8), (2, 1, 0.0), (0, 3, 1.0), (1, 3, 0.3)], seed=4)
    recipe = g.to_recipe(x)
    assert {m for m, _ in path_of(recipe[1])} == {BOTH_STAGE, models["a"], models["b"]}
    builder = CandidateBuilder(seed=0)
    sd, plan = builder.build(recipe)
    assert plan.out_config["num_hidden_layers"] == 5

    f = tmp_path / "best.yml"
    f.write_text(recipe_yaml(recipe))
    out = tmp_path / "multi"
    proc = run_cli("multi", f, out, "--random-seed", "0", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / BOTH_STAGE / "config.json").is_file()
    written = load_dir(out / "final")
    assert sorted(written) == sorted(sd)
    for name, t in written.items():
        assert t.dtype == sd[name].dtype and torch.equal(t, sd[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(str(out / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 5
    # the stage-1 tensors really went into the path: the first layer is the merge's, scaled
    merged = load_dir(out / BOTH_STAGE)
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(sd[q], merged[q]) and torch.allclose(sd[o], merged[o] * 0.5)

    # the padded build (what the evaluators score) holds the same path, then identity layers
    sd_pad, plan_pad = builder.build(g.for_evaluator(recipe))
    assert plan_pad.out_config["num_hidden_layers"] == 6
    assert all(torch.equal(sd_pad[k], v) for k, v in sd.items())
    assert not sd_pad["model.layers.5.mlp.down_proj.weight"].any()


# ------------------------------------------------------------------------------------------------------------
# a short search (stand-in scorer) writes a runnable best_config.yml, and resumes exactly
# ------------------------------------------------------------------------------------------------------------
def search_conf(models, **search) -> dict:
    genome = genome_dict(models, merge_method="linear", dataflow={"max_layers": 6, "repeats": 1, "scale": 1.0})
    del genome["base_model"]
    return {"name": "both", "seed": 0, "genome": genome, "tasks": TASKS,
            "search": {"popsize": 6, "max_fevals": 12, "seed": 0, "sigma0": 0.3, **search},
            "evaluation": {"workers": 2, "in_flight": 1, "score_inputs": False}}


def run(models, store, resume=False, report=False, **search):
    from evolve.search import RunOptions, run_search

    cfg = config_from_dict(search_conf(models, **search))
    return run_search(cfg, str(store), RunOptions(quiet=True, report=report, resume=resume),
                      evaluator_cls=FakeEvaluator)


@pytest.fixture(scope="module")
def searched(models, ray_cluster, tmp_path_factory) -> Path:
    """A whole search's storage (12 evaluations, 2 generations)."""
    store = tmp_path_factory.mktemp("both-search") / "store"
    run(models, store, report=True)
    return store


def test_search_writes_a_runnable_two_stage_best_config(searched, tmp_path):
    hist = Storage(str(searched)).read_history()
    assert len(hist) == 12 and all(r["status"] == "ok" for r in hist)
    assert all(isinstance(r["recipe"], list) and len(r["recipe"]) == 2 for r in hist)
    text = (searched / "best_config.yml").read_text()
    assert "# run it with: ray-merge multi best_config.yml OUTPUT_DIR" in text
    docs = list(yaml.safe_load_all(text))
    best = max(hist, key=lambda r: r["score"])
    assert docs == best["recipe"] and docs[0]["name"] == BOTH_STAGE and docs[1]["merge_method"] == "passthrough"
    assert "ray-merge multi it unchanged" in (searched / "summary.txt").read_text()
    assert (searched / "best_params.png").is_file()

    out = tmp_path / "out"
    proc = run_cli("multi", searched / "best_config.yml", out, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == len(path_of(docs[1]))


def test_search_resumes_exactly(models, searched, tmp_path):
    """Interrupted after one generation and resumed: the same evaluations as the uninterrupted search."""
    store = tmp_path / "store"
    run(models, store, max_fevals=6)
    assert len(Storage(str(store)).read_history()) == 6
    run(models, store, resume=True)
    assert comparable(Storage(str(store)).read_history()) == comparable(Storage(str(searched)).read_history())


def test_save_final_model_runs_both_stages(models, tmp_path):
    """``--save-final-model`` (evolve.stages.run_stages) merges a two-stage recipe as `ray-merge multi` does."""
    from evolve.stages import run_stages
    from ray_merge.options import MergeOptions

    g = make(models)
    recipe = g.to_recipe(genotype(g, [(0, 0, 0.5), (1, 1, 0.5), (0, 2, 0.5)], seed=2))
    out = tmp_path / "final_model"
    run_stages(recipe, str(out), str(tmp_path), MergeOptions(random_seed=0, quiet=True), source="best.yml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]  # the scratch stage is gone
    from evolve.evaluator import CandidateBuilder

    sd, _ = CandidateBuilder(seed=0).build(recipe)
    written = load_dir(out)
    import torch

    assert sorted(written) == sorted(sd) and all(torch.equal(written[k], sd[k]) for k in sd)


@pytest.mark.slow
def test_both_demo_search_with_lm_eval(tmp_path):
    """configs/evolve/both-demo.yml, shortened, with the real evaluator (in-memory two-stage builds, lm-eval on
    the demo tasks): every candidate and input scores; `ray-merge multi` runs the best recipe."""
    import json
    import os

    from evolve.demo_models import DEFAULT_OUT, ensure_demo_models

    demo = Path(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT)
    ensure_demo_models(demo, seed=0, log=lambda *_: None)
    store = tmp_path / "store"
    env = dict(ENV, RAY_MERGE_DEMO_MODELS=str(demo))
    proc = run_cli("evolve", REPO / "configs" / "evolve" / "both-demo.yml", "--storage-path", store,
                   "--max-fevals", "4", "--popsize", "4", "--set", "evaluation.limit=8", "--set",
                   "evaluation.workers=1", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (store / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(r["status"] == "ok" for r in history), history
    assert all(r["recipe"][0]["merge_method"] == "task_arithmetic" for r in history)
    inputs = [json.loads(line) for line in (store / "inputs.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in inputs) == ["ok", "ok", "ok"]  # base and the fine-tunes, padded to 8
    out = tmp_path / "out"
    proc = run_cli("multi", store / "best_config.yml", out, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out / "final"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
