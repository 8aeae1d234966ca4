"""Multi-objective search (``search.strategy: nsga2``): the front, NSGA-II's exact replay, its outputs and resume.

The searches run on Ray with a stand-in evaluator (tests/evolve_fake.py: no model is built, no lm-eval) over
tiny local models, so the search loop, checkpoints and outputs are tested in seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import load_dir, local_ray, run_cli
from evolve_fake import FakeEvaluator, comparable, search_config, use_by_value

from evolve.config import config_from_dict
from evolve.genome import Genome
from evolve.pareto import non_dominated, objectives, pareto_front
from evolve.searcher import NSGA2Searcher
from evolve.storage import Storage
from ray_merge.errors import UserError

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from models import make_family

    root = tmp_path_factory.mktemp("mofam")
    make_family(str(root), "llama", n_finetunes=2, seed=3, hidden=32, layers=4, intermediate=64, heads=2,
                kv_heads=1)
    return {"base": str(root / "llama_base"), "a": str(root / "llama_ft0"), "b": str(root / "llama_ft1")}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    use_by_value()
    with local_ray("rmo") as ray:
        yield ray.get_runtime_context().gcs_address


def history(store) -> list[dict]:
    return Storage(str(store)).read_history()


def run(models, store, report=False, resume=False, **search):
    from evolve.search import RunOptions, run_search

    cfg = config_from_dict(search_config(models, strategy="nsga2", **search))
    return run_search(cfg, str(store), RunOptions(quiet=True, report=report, resume=resume),
                      evaluator_cls=FakeEvaluator)


# ------------------------------------------------------------------------------------------------------------
# the front, without a search
# ------------------------------------------------------------------------------------------------------------
TASKS = [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}]


def rec(i, a, b, gen=0):
    return {"id": f"g{gen:03d}-{i:02d}", "generation": gen, "eval_number": i + 1, "status": "ok",
            "scores": {"a": a, "b": b}, "score": a + b, "recipe": {}}


def test_front_is_the_non_dominated_set_one_per_score_vector():
    hist = [rec(0, 0.2, 0.9), rec(1, 0.5, 0.5), rec(2, 0.9, 0.1), rec(3, 0.4, 0.4),  # 3: dominated by 1
            rec(4, 0.5, 0.5),  # 4: the same scores as 1: counted once (the earlier)
            rec(5, 0.1, 0.9), rec(6, 0.8, 0.1),  # dominated by 0 / by 2 (equal on one task, worse on the other)
            dict(rec(7, 1.0, 1.0), status="failed")]
    front = pareto_front(hist, TASKS)
    assert [r["id"] for r in front] == ["g000-02", "g000-01", "g000-00"]  # by the first objective, best first
    # a negative weight: lower is better on that task
    neg = pareto_front(hist, [{"name": "a", "weight": 1.0}, {"name": "b", "weight": -1.0}])
    assert [r["id"] for r in neg] == ["g000-02"]
    assert non_dominated(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4]])) == [0, 1, 2]


def test_nsga2_checkpoint_replays_to_the_same_state(models):
    cfg = config_from_dict(search_config(models, strategy="nsga2"))
    genome = Genome.from_config(cfg.genome)
    s = NSGA2Searcher.start(genome, cfg.search, n_obj=2)
    assert s.dim == genome.dim == 4
    first = s.ask()
    assert len(first) == 6 and np.allclose(first[0], genome.initial())  # the genome's start is a candidate
    f = lambda pop: [[-x[0] - x[1], -(1 - x[0]) - x[2]] for x in pop]  # noqa: E731
    s.tell(first, f(first))
    for _ in range(2):
        pop = s.ask()
        s.tell(pop, f(pop))
    pending = s.ask()
    meta, arrays = s.state()
    meta = json.loads(json.dumps(meta))  # as the checkpoint holds it
    r = NSGA2Searcher.restore(meta, arrays, "<ckpt>")
    assert np.array_equal(np.array(r.pending), np.array(pending))
    for _ in range(2):  # and both go on alike
        a, b = s.pending or s.ask(), r.pending or r.ask()
        assert np.array_equal(np.array(a), np.array(b))
        s.tell(a, f(a))
        r.tell(b, f(b))
        s.pending = r.pending = None
    bad = json.loads(json.dumps(meta))
    bad["told"][1][0][0] += 0.5  # another history: the replay ends elsewhere
    with pytest.raises(UserError, match="cannot be replayed"):
        NSGA2Searcher.restore(bad, arrays, "<ckpt>")
    bad = json.loads(json.dumps(meta))
    bad["told"][0] = bad["told"][0][:3]
    with pytest.raises(UserError, match="cannot be replayed: ValueError: generation 0"):
        NSGA2Searcher.restore(bad, arrays, "<ckpt>")


@pytest.mark.parametrize("search,tasks,key,msg", [
    ({"strategy": "nsga3"}, None, "search.strategy", "unknown strategy"),
    ({"strategy": "nsga2"}, ["only_one"], "search.strategy", "two or more tasks"),
    ({"strategy": "nsga2", "sigma0": 0.2}, None, "search.sigma0", "CMA-ES setting"),
    ({"strategy": "nsga2", "cma_options": {"tolx": 1e-3}}, None, "search.cma_options", "CMA-ES setting"),
])
def test_strategy_config_errors(models, search, tasks, key, msg):
    conf = search_config(models)
    conf["search"].update(search)
    if tasks:
        conf["tasks"] = tasks
    with pytest.raises(UserError, match=msg) as e:
        config_from_dict(conf, source="s.yml")
    assert f"s.yml: {key}:" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# searches (Ray, stand-in evaluator)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nsga2_search(models, ray_cluster, tmp_path_factory):
    store = tmp_path_factory.mktemp("nsga2") / "store"
    summary = run(models, store, report=True)
    return {"store": store, "summary": summary}


def test_nsga2_search_writes_a_mutually_non_dominated_front(nsga2_search):
    store = nsga2_search["store"]
    hist = history(store)
    assert nsga2_search["summary"]["stop_reason"] == "max_fevals"
    assert [r["id"] for r in sorted(hist, key=lambda r: r["id"])] == [f"g{g:03d}-{i:02d}" for g in range(3)
                                                                       for i in range(6)]
    doc = json.loads((store / "pareto.json").read_text())
    front = doc["front"]
    assert doc["evaluations"] == 18 and len(front) >= 2
    tasks = [{"name": "task_a", "weight": 1.0}, {"name": "task_b", "weight": 1.0}]
    pts = np.array([m["objectives"] for m in front])
    for i in range(len(pts)):  # no member dominates another
        for j in range(len(pts)):
            assert i == j or not (np.all(pts[i] >= pts[j]) and np.any(pts[i] > pts[j]))
    for r in hist:  # and every evaluation is dominated by, or equal to, a member
        o = objectives(r["scores"], tasks)
        assert any(np.all(p >= o) for p in pts)
    by_id = {r["id"]: r for r in hist}
    for m in front:
        assert by_id[m["id"]]["scores"] == m["scores"]
        on_disk = yaml.safe_load((store / m["file"]).read_text())
        assert on_disk == by_id[m["id"]]["recipe"]
    assert sorted(os.listdir(store / "pareto")) == [f"front_{i:03d}.yml" for i in range(len(front))]
    for name in ("pareto.png", "progress.png", "best_config.yml", "checkpoint.npz"):
        assert (store / name).stat().st_size > 0, name
    best = json.loads((store / "best.json").read_text())
    assert best["score"] == max(r["score"] for r in hist)  # best_config.yml: the best combined score
    assert "Pareto front (NSGA-II, 2 objectives)" in (store / "summary.txt").read_text()


def test_front_recipes_run_with_ray_merge_run_and_load(nsga2_search, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from evolve.evaluator import CandidateBuilder

    store = nsga2_search["store"]
    front = json.loads((store / "pareto.json").read_text())["front"]
    for m in (front[0], front[-1]):
        out = tmp_path / m["id"]
        proc = run_cli("run", store / m["file"], out, "--quiet")
        assert proc.returncode == 0, proc.stderr[-2000:]
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.num_hidden_layers == 4
        sd, _ = CandidateBuilder(seed=0).build(yaml.safe_load((store / m["file"]).read_text()))
        on_disk = load_dir(out)
        assert set(on_disk) == set(sd) and all(torch.equal(on_disk[k], sd[k]) for k in sd)


# `python DRIVER ADDRESS CONFIG_JSON STORAGE`: the nsga2 search on the test's Ray cluster; candidate HANG
# never finishes (the test kills the driver while it waits).
DRIVER = """
import json
import sys
import time

sys.path.insert(0, {tests!r})
from evolve_fake import FakeEvaluator, use_by_value

from evolve.config import config_from_dict
from evolve.search import RunOptions, run_search


class Hangs(FakeEvaluator):
    def evaluate(self, cid, recipe, subsample=None):
        if cid == {hang!r}:
            time.sleep(3600)
        return super().evaluate(cid, recipe, subsample)


use_by_value()
cfg = config_from_dict(json.loads(sys.argv[2]))
run_search(cfg, sys.argv[3], RunOptions(address=sys.argv[1], quiet=True, report=False), evaluator_cls=Hangs)
"""


def test_kill_mid_generation_then_resume_gives_the_uninterrupted_history(models, nsga2_search, ray_cluster,
                                                                         tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS), hang="g001-03"))
    store = tmp_path / "store"
    conf = search_config(models, strategy="nsga2")
    proc = subprocess.Popen([sys.executable, str(driver), ray_cluster, json.dumps(conf), str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    hist_file = store / "history.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if hist_file.exists() and len(hist_file.read_text().splitlines()) >= 11:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = history(store)
    assert len(before) == 11 and "g001-03" not in {r["id"] for r in before}
    assert json.loads(str(np.load(store / "checkpoint.npz")["meta"]))["generation"] == 1
    run(models, store, resume=True)
    after = history(store)
    assert after[:11] == before  # kept as they were
    assert comparable(after) == comparable(history(nsga2_search["store"]))  # the uninterrupted search's
    same = [json.loads((s / "pareto.json").read_text()) for s in (store, nsga2_search["store"])]
    assert same[0] == same[1]
    a, b = (json.loads(str(np.load(s / "checkpoint.npz")["meta"])) for s in (store, nsga2_search["store"]))
    assert a["told"] == b["told"] and a["check"] == b["check"]
