"""Evolution, fast (no Ray, no lm-eval runs): mergekit-evolve's genes per method and flags, the pickle-free
checkpoint (replayed exactly; a crafted file never runs), TensorBoard logs, the heat map's layout.
"""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import yaml

from evolve.config import config_from_dict
from evolve.genome import Genome
from evolve.searcher import Searcher
from evolve.storage import Storage
from ray_merge.errors import UserError

TASKS = [{"name": "demo_arith", "metric": "exact_match,none"}]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from models import make_family

    root = tmp_path_factory.mktemp("evparity")
    make_family(str(root), "llama", n_finetunes=2, seed=3, hidden=32, layers=4, intermediate=64, heads=2,
                kv_heads=1)
    return {"base": str(root / "llama_base"), "a": str(root / "llama_ft0"), "b": str(root / "llama_ft1")}


def genome_of(fam, method: str, **genome) -> Genome:
    spec = {"models": [fam["a"], fam["b"]], "merge_method": method, **genome}
    if method != "linear":
        spec.setdefault("base_model", fam["base"])
    if method == "slerp":
        spec["models"] = [fam["base"], fam["a"]]
    return Genome.from_config(config_from_dict({"genome": spec, "tasks": TASKS}).genome)


# -- genes per method, as mergekit-evolve defines them ---------------------------------------------------------
@pytest.mark.parametrize("method,genes,normalize", [
    ("linear", ["weight"], True),
    ("task_arithmetic", ["weight"], None),  # density is not searched (mergekit-evolve: weights only)
    ("ties", ["weight", "density"], True),
    ("dare_ties", ["weight", "density"], True),
    ("slerp", ["t"], None),
])
def test_genes_per_method_and_normalize_default_as_mergekit_evolve(fam, method, genes, normalize):
    g = genome_of(fam, method, layer_granularity=2)
    assert [p.name for p in g.params] == genes
    recipe = g.to_recipe(g.initial())
    assert (recipe.get("parameters") or {}).get("normalize") == normalize
    # an explicit normalize wins
    if normalize:
        off = genome_of(fam, method, normalize=False)
        assert off.to_recipe(off.initial())["parameters"]["normalize"] is False


def test_other_parameters_are_searched_only_when_given_bounds(fam):
    g = genome_of(fam, "task_arithmetic", parameters={"density": {"min": 0.2, "max": 1.0}})
    assert [(p.name, p.lo, p.hi) for p in g.params] == [("weight", 0.0, 1.0), ("density", 0.2, 1.0)]


def test_weight_bounds_follow_allow_negative_weights(fam):
    pos = genome_of(fam, "task_arithmetic")
    neg = genome_of(fam, "task_arithmetic", allow_negative_weights=True)
    assert (pos.params[0].lo, pos.params[0].hi) == (0.0, 1.0)
    assert (neg.params[0].lo, neg.params[0].hi) == (-1.0, 1.0)
    # whatever CMA-ES proposes, a weight is never negative without allow_negative_weights
    for x in (np.zeros(pos.dim), np.full(pos.dim, -3.0)):
        assert all(m["parameters"]["weight"] == 0.0 for m in pos.to_recipe(x)["models"][:2])
    assert all(m["parameters"]["weight"] == -1.0 for m in neg.to_recipe(np.zeros(neg.dim))["models"][:2])


def test_default_bounds_stay_within_what_the_method_accepts(fam):
    g = genome_of(fam, "della")  # epsilon: 0 .. 0.5 in the registry
    eps = next(p for p in g.params if p.name == "epsilon")
    assert eps.hi == 0.5


def test_benchmark_tasks_need_the_flag(fam):
    from evolve.config import check_benchmark_tasks

    cfg = config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "merge_method": "linear"},
                            "tasks": ["demo_arith", "gsm8k"]})
    with pytest.raises(UserError, match=r"tasks\[1\].*gsm8k is a common benchmark"):
        check_benchmark_tasks(cfg, allowed=False)
    check_benchmark_tasks(cfg, allowed=True)
    check_benchmark_tasks(config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "merge_method": "linear"},
                                            "tasks": ["gsm8k_train"]}), allowed=False)


def test_mergekit_evolve_flags_are_accepted_with_their_meaning():
    import argparse

    from ray_merge.cli import evolve as cli
    from ray_merge.cli.options import options_from_args
    from ray_merge.options import EvolveOptions

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "evolve", "c.yml", "--storage-path", "s", "--vllm", "--timeout", "3600", "--force-population-size", "12",
        "--max-fevals", "50", "--num-gpus", "4", "--no-merge-cuda", "--task-search-path", "t", "--batch-size", "8",
        "--i-understand-the-depths-of-the-evils-i-am-unleashing", "--save-final-model", "--wandb",
        "--wandb-project", "p", "--strategy", "buffered", "--in-memory", "--no-reshard", "--sigma0", "0.2",
        "--random-seed", "3", "--allow-crimes", "--load-in-8bit"])
    ev = options_from_args(args, EvolveOptions)
    assert (ev.backend, ev.max_time, ev.popsize, ev.max_fevals, ev.num_gpus, ev.merge_cuda) == \
        ("vllm", 3600.0, 12, 50, 4, False)
    assert ev.allow_benchmark_tasks and ev.save_final_model and ev.wandb and ev.wandb_project == "p"
    assert (ev.strategy, ev.in_memory, ev.reshard, ev.batch_size) == ("buffered", True, False, "8")
    assert cli._overrides(args, ev)[-3:] == ["evaluation.batch_size=8", "evaluation.merge_device=cpu",
                                            "evaluation.num_gpus=1"]
    assert parser.parse_args(["evolve", "c.yml", "--storage-path", "s", "--eval-timeout", "60"]).eval_timeout == 60


# -- the checkpoint: numbers only, replayed exactly --------------------------------------------------------------
def _objective(x) -> float:
    return float(np.sum((np.asarray(x) - 0.3) ** 2))


def _run(s: Searcher, population, generations: int):
    out = []
    for _ in range(generations):
        s.tell(population, [_objective(x) for x in population])
        population = s.ask()
        out.append(np.array(population))
    return out, float(s.es.sigma), np.array(s.es.mean)


@pytest.mark.parametrize("pending", [True, False])
def test_checkpoint_replays_the_strategy_exactly(fam, tmp_path, pending):
    cfg = config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "base_model": fam["base"],
                                       "merge_method": "ties", "layer_granularity": 2}, "tasks": TASKS,
                            "search": {"popsize": 5}})
    g = Genome.from_config(cfg.genome)
    st = Storage(str(tmp_path / "s"))
    st.start(cfg, resume=False)
    s = Searcher.start(g, cfg.search, "x")
    for _ in range(4):
        pop = s.ask()
        s.tell(pop, [_objective(x) for x in pop])
    pop = s.ask() if pending else None
    meta, arrays = s.state()
    st.save_checkpoint(dict(meta, generation=4), arrays)
    assert not any(name.endswith(".pkl") for name in os.listdir(st.path))
    with open(st.file("checkpoint.npz"), "rb") as f:
        assert f.read(2) == b"PK"  # a zip of .npy arrays
    if not pending:
        pop = s.ask()
    uninterrupted = _run(s, pop, 6)

    np.random.seed(999)  # whatever happened to the RNGs in between
    random.seed(999)
    meta, arrays = st.load_checkpoint()
    r = Searcher.restore(meta, arrays, st.file("checkpoint.npz"), cfg.search.cma_options)
    assert (r.pending is not None) == pending
    rpop = r.pending if pending else r.ask()
    assert all(np.array_equal(a, b) for a, b in zip(pop, rpop))
    resumed = _run(r, rpop, 6)
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted[0], resumed[0]))
    assert uninterrupted[1] == resumed[1] and np.array_equal(uninterrupted[2], resumed[2])


class _Marker:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def stored_search(fam, tmp_path):
    conf = {"genome": {"models": [fam["a"], fam["b"]], "base_model": fam["base"], "merge_method": "ties"},
            "tasks": TASKS}
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(conf))
    store = tmp_path / "store"
    Storage(str(store)).start(config_from_dict(conf, source=str(path)), resume=False)
    return path, store


@pytest.mark.parametrize("name,content", [
    ("checkpoint.npz", "pickle"),
    ("checkpoint.pkl", "pickle"),  # an earlier version's file name
    ("checkpoint.npz", "npz-object-array"),
    ("checkpoint.npz", b"garbage \x00\x01"),
    ("checkpoint.npz", "npz-text-option"),
])
def test_crafted_checkpoint_never_runs_and_is_a_one_line_error(stored_search, tmp_path, capsys, name, content):
    from ray_merge.cli import main

    cfg_path, store = stored_search
    marker = tmp_path / "pwned"
    target = store / name
    if content == "pickle":
        target.write_bytes(pickle.dumps({"version": 1, "es": _Marker(str(marker))}))
    elif content == "npz-object-array":
        with open(target, "wb") as f:
            np.savez(f, meta=np.array([_Marker(str(marker))], dtype=object))
    elif content == "npz-text-option":  # cma evaluates options given as text: never taken from a checkpoint
        cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
        s = Searcher.start(Genome.from_config(cfg.genome), cfg.search, "x")
        s.ask()
        meta, arrays = s.state()
        meta["start"]["options"]["CMA_active"] = f"open({str(marker)!r}, 'w') is None"
        Storage(str(store)).save_checkpoint(dict(meta, generation=0), arrays)
    else:
        target.write_bytes(content)
    rc = main(["evolve", str(cfg_path), "--storage-path", str(store), "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ray-merge: error:"), err
    assert "checkpoint" in err
    assert not marker.exists()


# -- TensorBoard and the plots ------------------------------------------------------------------------------------
def test_tensorboard_scalars_per_evaluation_and_generation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from evolve.tracking import Tracker

    tr = Tracker(str(tmp_path / "tb"), print)
    recs = [{"status": "ok", "scores": {"a": 0.1 * i, "b": 0.2}, "score": 0.1 * i + 0.2, "eval_number": i + 1}
            for i in range(3)] + [{"status": "failed", "eval_number": 4}]
    for r in recs:
        tr.evaluation(r, 0.4)
    tr.generation(0, recs, 0.4)
    tr.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/a", "eval/b", "eval/score", "eval/best_so_far", "generation/a", "generation/score",
            "generation/score_mean", "generation/best_so_far"} <= tags
    assert [e.step for e in acc.Scalars("eval/score")] == [1, 2, 3]
    assert acc.Scalars("generation/score")[0].value == pytest.approx(0.4)


def test_best_params_plot_one_group_is_not_drawn_per_layer(fam, tmp_path, monkeypatch):
    from evolve import report

    g = genome_of(fam, "ties")  # one layer group: each value holds for the whole model
    assert g.n_groups == 1
    called = []
    monkeypatch.setattr(g, "layer_table", lambda x: called.append(x))
    report.plot_best_params(str(tmp_path / "p.png"), g, g.initial())
    assert not called and os.path.getsize(tmp_path / "p.png") > 1000
    g2 = genome_of(fam, "ties", layer_granularity=2)
    report.plot_best_params(str(tmp_path / "p2.png"), g2, g2.initial())
    assert os.path.getsize(tmp_path / "p2.png") > 1000


def test_finished_search_resumed_saves_the_final_model_without_ray(fam, tmp_path):
    """--save-final-model merges the best recipe into STORAGE/final_model; a finished search starts no Ray."""
    from conftest import load_dir

    from evolve.search import RunOptions, run_search

    cfg = config_from_dict({"genome": {"models": [fam["a"], fam["b"]], "base_model": fam["base"],
                                       "merge_method": "ties"}, "tasks": TASKS, "evaluation": {"score_inputs": False},
                            "search": {"popsize": 2, "max_fevals": 2}})
    g = Genome.from_config(cfg.genome)
    st = Storage(str(tmp_path / "s"))
    st.start(cfg, resume=False)
    s = Searcher.start(g, cfg.search, "x")
    pop = s.ask()
    for i, x in enumerate(pop):
        st.append_history({"id": f"g000-{i:02d}", "generation": 0, "status": "ok", "score": float(i),
                           "scores": {"demo_arith": float(i)}, "genotype": list(x), "recipe": g.to_recipe(x),
                           "eval_number": i + 1})
    s.tell(pop, [0.0, -1.0])
    meta, arrays = s.state()
    st.save_checkpoint(dict(meta, generation=1, ids=None), arrays)
    summary = run_search(cfg, st.path, RunOptions(resume=True, save_final_model=True, report=False, quiet=True))
    assert summary["stop_reason"] == "max_fevals"
    merged = load_dir(tmp_path / "s" / "final_model")
    assert merged and os.path.exists(tmp_path / "s" / "final_model" / "config.json")
