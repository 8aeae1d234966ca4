"""Evolution: config validation, genome <-> recipe, storage and report (fast; no Ray, no lm-eval runs).

The searches themselves (Ray, lm-eval, kill and resume, failures) are in test_evolve_search.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from evolve.config import config_from_dict, load_config
from evolve.genome import Genome
from ray_merge.errors import UserError
from ray_merge.methods import all_methods
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict

TASKS = [{"name": "demo_arith", "metric": "exact_match,none"}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from models import make_family

    root = tmp_path_factory.mktemp("evfam")
    make_family(str(root), "llama", n_finetunes=2, seed=3, hidden=32, layers=4, intermediate=64, heads=2,
                kv_heads=1)
    return {"base": str(root / "llama_base"), "a": str(root / "llama_ft0"), "b": str(root / "llama_ft1")}


def genome_of(genome: dict, **top) -> Genome:
    cfg = config_from_dict({"genome": genome, "tasks": TASKS, **top})
    return Genome.from_config(cfg.genome)


def roundtrip(g: Genome, seed: int = 0) -> dict:
    """x -> recipe -> x' -> recipe': the same; the recipe validates and plans."""
    x = np.random.default_rng(seed).uniform(size=g.dim)
    recipe = g.to_recipe(x)
    back = g.from_recipe(yaml.safe_load(yaml.safe_dump(recipe)))  # through YAML, as best_config.yml is
    exact = [i for i, gene in enumerate(g.genes) if not g._param[gene.param].is_int]  # ints are rounded
    assert np.allclose(back[exact], x[exact], atol=1e-12)
    assert g.to_recipe(back) == recipe
    plan_recipe(recipe_from_dict(recipe, source="<genome>"), seed=0)
    return recipe


def test_mergekit_style_genome_round_trip(fam):
    g = genome_of({"models": [fam["a"], fam["b"]], "base_model": fam["base"], "merge_method": "ties",
                   "layer_granularity": 2, "filters": ["self_attn", "mlp"], "normalize": True})
    # 2 params (weight, density) x 2 layer groups x 2 models x 3 filter sets
    assert g.dim == 24 and [p.name for p in g.params] == ["weight", "density"]
    recipe = roundtrip(g)
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [2, 4]]
    assert recipe["slices"][0]["sources"][-1] == {"model": fam["base"], "layer_range": [0, 2]}  # base appended
    w = recipe["slices"][1]["sources"][0]["parameters"]["weight"]
    assert [c.get("filter") for c in w] == ["self_attn", "mlp", None]
    assert recipe["parameters"] == {"normalize": True}


def test_smooth_genome_writes_gradients(fam):
    g = genome_of({"models": [fam["a"], fam["b"]], "base_model": fam["base"], "merge_method": "task_arithmetic",
                   "layer_granularity": 1, "smooth": True, "parameters": {"density": 1.0}})
    recipe = roundtrip(g, seed=1)
    weights = recipe["models"][0]["parameters"]["weight"]
    assert isinstance(weights, list) and len(weights) == 4  # one anchor per layer group
    assert recipe["models"][-1] == {"model": fam["base"]}
    labels, table = g.layer_table(g.from_recipe(recipe))
    assert table.shape == (2, 4) and np.allclose(table[0], weights)


def test_global_parameter_and_bounds(fam):
    g = genome_of({"models": [fam["base"], fam["a"]], "base_model": fam["base"], "merge_method": "slerp",
                   "layer_granularity": 2, "parameters": {"t": {"min": 0.2, "max": 0.8, "init": 0.5}}})
    assert [(p.name, p.per_model, p.lo, p.hi) for p in g.params] == [("t", False, 0.2, 0.8)]
    recipe = roundtrip(g)
    assert all(0.2 <= s["parameters"]["t"] <= 0.8 for s in recipe["slices"])
    assert np.allclose(g.initial(), 0.5)
    # task vectors: the base model gets no weight gene (Param.non_base), even when listed among the models
    g2 = genome_of({"models": [fam["base"], fam["a"], fam["b"]], "base_model": fam["base"],
                    "merge_method": "task_arithmetic", "allow_negative_weights": True,
                    "parameters": {"density": 1.0, "lambda": {"min": 0.5, "max": 1.5}}})
    assert [(p.name, p.model_slots, p.lo) for p in g2.params] == [("weight", (1, 2), -1.0), ("lambda", (), 0.5)]
    roundtrip(g2)


def test_every_registered_method_gets_a_genome_or_a_clear_error(fam):
    """Genome parameters come from the registry's Param specs: no per-method table."""
    for name, m in all_methods().items():
        spec = {"models": [fam["a"], fam["b"]], "merge_method": name}
        if m.base_model != "none":
            spec["base_model"] = fam["base"]
        if m.max_inputs == 2:
            spec["models"] = [fam["base"], fam["a"]]
        try:
            g = genome_of(spec)
        except UserError as e:
            numeric = [p for p in m.params if p.kind in (int, float)]
            if name == "passthrough":
                assert "nothing to search" in str(e)
                continue
            assert "no parameter searched by default" in str(e), (name, e)
            if not numeric:  # model_stock: nothing numeric to search at all
                continue
            spec["parameters"] = {p.name: ({"min": 1, "max": 20} if p.kind is int else {"min": 0.0, "max": 1.0})
                                  for p in numeric}
            g = genome_of(spec)
        roundtrip(g)


@pytest.mark.parametrize("mutate,key,msg", [
    (lambda c: c.update(bogus=1), "bogus", "unknown key"),
    (lambda c: c["genome"].update(merge_method="nope"), "genome.merge_method", "unknown merge method"),
    (lambda c: c["genome"].pop("base_model"), "genome.base_model", "needs a base_model"),
    (lambda c: c["genome"].update(parameters={"wieght": {"min": 0, "max": 1}}), "genome.parameters.wieght",
     "takes no parameter"),
    (lambda c: c["genome"].update(parameters={"weight": {"min": 1, "max": 0}}), "genome.parameters.weight",
     "must be below"),
    (lambda c: c["genome"].update(parameters={"normalize": {"min": 0, "max": 1}}), "genome.parameters.normalize",
     "cannot be searched"),
    (lambda c: c["genome"].update(layer_granularity=3), "genome.layer_granularity", "does not divide"),
    (lambda c: c["genome"].update(models=["/no/such/model"]), "genome.models[0]", "no such directory"),
    (lambda c: c.update(evaluation={"backend": "tgi"}), "evaluation.backend", "unknown backend"),
    (lambda c: c.update(evaluation={"lm_eval": {"tasks": ["x"]}}), "evaluation.lm_eval.tasks", "set by ray-merge"),
    (lambda c: c.update(search={"popsize": 1}), "search.popsize", "at least 2"),
    (lambda c: c.update(tasks=[{"name": "t", "wieght": 2}]), "tasks[0].wieght", "unknown key"),
    (lambda c: c.update(limit=5, evaluation={"limit": 5}), "limit", "not both"),
])
def test_bad_config_is_one_line_user_error_naming_file_and_key(fam, tmp_path, capsys, mutate, key, msg):
    from ray_merge.cli import main

    conf = {"genome": {"models": [fam["a"], fam["b"]], "base_model": fam["base"], "merge_method": "ties",
                       "layer_granularity": 2}, "tasks": TASKS}
    mutate(conf)
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(conf))
    rc = main(["evolve", str(path), "--storage-path", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ray-merge: error:"), err
    assert f"{path}: {key}:" in err and msg in err, err
    assert not os.path.exists(tmp_path / "store" / "history.jsonl")


def test_relative_paths_resolve_against_the_config_and_mergekit_top_level_keys(fam, tmp_path):
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    rel = os.path.relpath(fam["a"], cfgdir)
    (cfgdir / "tasks").mkdir()
    path = cfgdir / "s.yml"
    path.write_text(yaml.safe_dump({
        "genome": {"models": [rel, {"model": fam["b"]}], "merge_method": "linear"},
        "tasks": ["demo_arith", {"name": "demo_reverse", "weight": 2.0, "metric": "exact_match,none"}],
        "limit": 10, "num_fewshot": 0, "apply_chat_template": False,
        "evaluation": {"include_paths": ["tasks"]}}))
    cfg = load_config(str(path), ["search.max_fevals=7"])
    assert cfg.genome.models == [fam["a"], fam["b"]]
    assert cfg.evaluation.include_paths == [str(cfgdir / "tasks")]
    assert cfg.evaluation.limit == 10 and cfg.search.max_fevals == 7
    assert [(t.name, t.weight, t.metric) for t in cfg.tasks] == [("demo_arith", 1.0, "acc,none"),
                                                                ("demo_reverse", 2.0, "exact_match,none")]


def test_storage_refuses_to_mix_searches(fam, tmp_path):
    from evolve.storage import Storage

    conf = {"genome": {"models": [fam["a"], fam["b"]], "merge_method": "linear"}, "tasks": TASKS}
    cfg = config_from_dict(conf, source="a.yml")
    st = Storage(str(tmp_path / "s"))
    with pytest.raises(UserError, match="nothing to resume"):
        st.start(cfg, resume=True)
    st.start(cfg, resume=False)
    Storage(str(tmp_path / "s")).start(cfg, resume=False)  # nothing evaluated yet: may start again
    st.append_history({"id": "g000-00"})
    with pytest.raises(UserError, match="already holds a search"):
        Storage(str(tmp_path / "s")).start(cfg, resume=False)
    Storage(str(tmp_path / "s")).start(config_from_dict(dict(conf, search={"max_fevals": 500})), resume=True)
    changed = config_from_dict(dict(conf, limit=3), source="b.yml")
    with pytest.raises(UserError, match="evaluation.limit differs"):
        Storage(str(tmp_path / "s")).start(changed, resume=True)


def test_history_line_cut_by_a_kill_is_dropped_on_resume(fam, tmp_path):
    from evolve.storage import Storage

    cfg = config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "merge_method": "linear"}, "tasks": TASKS})
    st = Storage(str(tmp_path / "s"))
    st.start(cfg, resume=False)
    st.append_history({"id": "g000-00", "score": 1.0})
    with open(st.file("history.jsonl"), "a") as f:
        f.write('{"id": "g000-01", "sco')  # killed mid-write
    st.start(cfg, resume=True)
    st.append_history({"id": "g000-01", "score": 2.0})
    assert [r["id"] for r in st.read_history()] == ["g000-00", "g000-01"]


def test_report_plots_and_summary(fam, tmp_path):
    from evolve.report import write_report
    from evolve.storage import Storage

    cfg = config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "merge_method": "linear",
                                       "layer_granularity": 2}, "tasks": TASKS})
    g = Genome.from_config(cfg.genome)
    st = Storage(str(tmp_path / "s"))
    st.start(cfg, resume=False)
    rng = np.random.default_rng(0)
    for i in range(6):
        x = rng.uniform(size=g.dim)
        ok = i != 3
        st.append_history({"id": f"g000-{i:02d}", "generation": i // 3, "status": "ok" if ok else "failed",
                           "genotype": list(x), "scores": {"demo_arith": i / 10} if ok else None,
                           "score": i / 10 if ok else None, "eval_number": i + 1, "session": "s1",
                           "attempts": [{"worker": f"eval-{i % 2}", "error": None, "eval_s": 1.0, "build_s": 0.1,
                                         "eval_start": 100.0 + i, "eval_end": 101.0 + i, "start": 99.0 + i}]})
    st.append_input({"id": "input:a", "status": "ok", "scores": {"demo_arith": 0.3}, "score": 0.3})
    text = write_report(st, g, cfg, {"session": "s1", "session_s": 10.0, "stop_reason": "max_fevals"})
    assert os.path.getsize(st.file("progress.png")) > 1000 and os.path.getsize(st.file("best_params.png")) > 1000
    assert "best merge (g000-05)" in text and "+0.2000" in text and "1 failed" in text
    assert open(st.file("summary.txt")).read().strip() == text.strip()
    assert len(text.splitlines()) < 30  # one screen
    json.dumps(text)
