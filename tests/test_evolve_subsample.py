"""Cheap fitness (``evaluation.subsample``): the draws, the agreement report, and a search that uses them.

The search runs on Ray with the stand-in evaluator of tests/evolve_fake.py (scores from the recipe, on the
examples evolve.subsample draws); one slow test checks the draw reaches lm-eval on a demo model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from evolve_fake import FakeEvaluator, comparable, fake_scores, search_config
from test_evolve_multiobjective import models, ray_cluster  # noqa: F401  (fixtures)

from evolve.config import config_from_dict
from evolve.storage import Storage
from evolve.subsample import (
    agreement,
    agreement_report,
    full_size,
    samples_for,
    subsample_indices,
    subsample_round,
    top_candidates,
)
from ray_merge.errors import UserError


def test_draws_are_deterministic_change_per_generation_and_stay_put_for_the_anchor():
    a = subsample_indices(200, 20, seed=0, round_=1, task="t")
    assert a == subsample_indices(200, 20, seed=0, round_=1, task="t")  # the same inputs: the same draw
    assert len(a) == len(set(a)) == 20 and a == sorted(a) and 0 <= a[0] and a[-1] < 200
    rounds = {tuple(subsample_indices(200, 20, 0, subsample_round("per_generation", g), "t")) for g in range(5)}
    assert len(rounds) == 5  # a new draw each generation
    assert len({tuple(subsample_indices(200, 20, 0, subsample_round("anchor", g), "t")) for g in range(5)}) == 1
    assert subsample_indices(200, 20, seed=1, round_=1, task="t") != a  # the seed and the task change it
    assert subsample_indices(200, 20, seed=0, round_=1, task="u") != a
    assert subsample_indices(15, 20, 0, 1, "t") == list(range(15))  # fewer examples than asked: all of them
    # with evaluation.limit the draw comes from the first `limit` examples (as lm-eval's limit counts them)
    assert full_size(200, 50) == 50 and full_size(200, 0.25) == 50 and full_size(10, 50) == 10
    s = samples_for({"t": 200, "u": 30}, {"size": 10, "seed": 0, "round": 3}, limit=40)
    assert set(s) == {"t", "u"} and max(s["t"]) < 40 and len(s["u"]) == 10


def test_agreement_on_a_constructed_case():
    # full ranks 1, 3, 2, 4, 5 against cheap ranks 1..5: sum d^2 = 2 -> rho = 1 - 6*2/(5*24) = 0.9;
    # one discordant pair of 10 -> tau = (9 - 1) / 10 = 0.8
    got = agreement([5, 4, 3, 2, 1], [0.9, 0.7, 0.8, 0.3, 0.1])
    assert got["spearman"] == pytest.approx(0.9) and got["kendall"] == pytest.approx(0.8)
    assert got["cheap_best_is_full_best"] is True and got["cheap_best_full_rank"] == 1 and got["n"] == 5
    rev = agreement([3, 2, 1], [1, 2, 3])
    assert rev["spearman"] == pytest.approx(-1) and rev["kendall"] == pytest.approx(-1)
    assert rev["cheap_best_is_full_best"] is False and rev["cheap_best_full_rank"] == 3
    flat = agreement([1, 1], [0.5, 0.7])  # a constant ranking: no correlation to speak of
    assert flat["spearman"] is None and flat["kendall"] is None


def test_agreement_report_checks_every_k_generations_and_at_the_end():
    def rec(g, i, cheap):
        return {"id": f"g{g:03d}-{i:02d}", "generation": g, "eval_number": 3 * g + i + 1, "status": "ok",
                "score": cheap}

    hist = [rec(0, 0, 0.5), rec(0, 1, 0.4), rec(0, 2, 0.1), rec(1, 0, 0.6), rec(1, 1, 0.2), rec(1, 2, 0.3),
            rec(2, 0, 0.9), rec(2, 1, 0.0), rec(2, 2, 0.45)]
    assert [r["id"] for r in top_candidates(hist, 3, 0)] == ["g000-00", "g000-01", "g000-02"]
    full = {"g000-00": 0.3, "g000-01": 0.4, "g000-02": 0.2, "g001-00": 0.5, "g002-00": 0.1, "g002-02": 0.6}
    rescored = {k: {"status": "ok", "score": v} for k, v in full.items()}
    spec = {"size": 8, "mode": "anchor", "seed": 0, "rescore_top": 3, "rescore_every": 2}
    report = agreement_report(hist, rescored, spec, last_generation=2)
    assert [c["after_generation"] for c in report["checks"]] == [1, 2]  # every 2 generations; 2 is the last
    first, final = report["checks"]
    assert first["ids"] == ["g001-00", "g000-00", "g000-01"] and first["full_scores"] == [0.5, 0.3, 0.4]
    assert first["spearman"] == pytest.approx(0.5) and first["cheap_best_is_full_best"] is True
    assert final is report["final"] and final["ids"] == ["g002-00", "g001-00", "g000-00"]
    assert final["cheap_best_is_full_best"] is False and final["cheap_best_full_rank"] == 3
    assert final["full_best_id"] == "g001-00" and final["kendall"] == pytest.approx(-1 / 3)
    json.dumps(report)


@pytest.mark.parametrize("sub,key,msg", [
    ({"mode": "anchor"}, "evaluation.subsample.size", "missing"),
    ({"size": 0}, "evaluation.subsample.size", "at least 1"),
    ({"size": 5, "mode": "sometimes"}, "evaluation.subsample.mode", "unknown mode"),
    ({"size": 5, "every": 2}, "evaluation.subsample.every", "unknown key"),
    ({"size": 5, "rescore_top": 0}, "evaluation.subsample.rescore_top", "at least 1"),
])
def test_subsample_config_errors(models, sub, key, msg):  # noqa: F811
    conf = search_config(models)
    conf["evaluation"]["subsample"] = sub
    with pytest.raises(UserError, match=msg) as e:
        config_from_dict(conf, source="s.yml")
    assert f"s.yml: {key}:" in str(e.value)
    conf["evaluation"]["subsample"] = {"size": 5}
    conf["evaluation"]["lm_eval"] = {"samples": {"task_a": [1, 2]}}
    with pytest.raises(UserError, match="evaluation.lm_eval.samples"):
        config_from_dict(conf, source="s.yml")


def test_subsample_is_part_of_the_scoring_settings_the_rescore_settings_are_not(models):  # noqa: F811
    plain = config_from_dict(search_config(models))
    assert "evaluation.subsample" not in plain.scoring_view()  # searches stored before the key resume as before
    conf = search_config(models)
    conf["evaluation"]["subsample"] = {"size": 5, "rescore_top": 3}
    a = config_from_dict(conf)
    assert a.evaluation.subsample == {"size": 5, "mode": "per_generation", "seed": 0, "rescore_top": 3,
                                      "rescore_every": None}
    assert a.scoring_view()["evaluation.subsample"] == {"size": 5, "mode": "per_generation", "seed": 0}
    conf["evaluation"]["subsample"] = {"size": 5, "rescore_top": 4, "rescore_every": 1}
    assert config_from_dict(conf).scoring_hash == a.scoring_hash
    conf["evaluation"]["subsample"] = {"size": 6}
    assert config_from_dict(conf).scoring_hash != a.scoring_hash


# ------------------------------------------------------------------------------------------------------------
# a search (Ray, stand-in evaluator)
# ------------------------------------------------------------------------------------------------------------
SUB = {"size": 10, "mode": "per_generation", "seed": 3, "rescore_top": 4, "rescore_every": 2}


def run(models, store, resume=False, max_time_s=None, strategy="cma"):  # noqa: F811
    from evolve.search import RunOptions, run_search

    conf = search_config(models, strategy=strategy)
    conf["evaluation"]["subsample"] = dict(SUB)
    return run_search(config_from_dict(conf), str(store),
                      RunOptions(quiet=True, report=True, resume=resume, max_time_s=max_time_s),
                      evaluator_cls=FakeEvaluator)


@pytest.fixture(scope="module")
def sub_search(models, ray_cluster, tmp_path_factory):  # noqa: F811
    store = tmp_path_factory.mktemp("sub") / "store"
    run(models, store)
    return store


def test_candidates_are_scored_on_their_generations_draw_and_the_top_re_scored_in_full(sub_search):
    st = Storage(str(sub_search))
    hist = st.read_history()
    tasks = [{"name": "task_a"}, {"name": "task_b"}]
    assert len(hist) == 18
    for r in hist:
        draw = {"size": 10, "seed": 3, "round": r["generation"] + 1}
        assert r["subsample"] == draw
        assert r["scores"] == fake_scores(r["recipe"], tasks, draw)
    rescored = {r["id"]: r for r in st._read_jsonl("rescored.jsonl")}
    # re-scored after generation 1 (every 2) and at the end: the top 4 then and the top 4 at the end
    want = {r["id"] for r in top_candidates(hist, 4, 1)} | {r["id"] for r in top_candidates(hist, 4)}
    assert set(rescored) == want and len(rescored) == sum(1 for _ in st._read_jsonl("rescored.jsonl"))
    by_id = {r["id"]: r for r in hist}
    for cid, r in rescored.items():
        assert r["scores"] == fake_scores(by_id[cid]["recipe"], tasks, None) and r["cheap_score"] == by_id[cid]["score"]
    report = json.loads((sub_search / "subsample_agreement.json").read_text())
    assert [c["after_generation"] for c in report["checks"]] == [1, 2]
    final = report["final"]
    top = top_candidates(hist, 4)
    assert final["ids"] == [r["id"] for r in top]
    expect = agreement([r["score"] for r in top], [rescored[r["id"]]["score"] for r in top])
    assert {k: final[k] for k in expect} == expect
    summary = (sub_search / "summary.txt").read_text()
    assert "subsample (10 examples/task, per_generation): top 4 re-scored" in summary
    best_full = sorted(rescored.values(), key=lambda r: (-r["score"], r["id"]))[0]
    assert f"score {best_full['score']:.6g}" in (sub_search / "best_full_config.yml").read_text().splitlines()[0]


def test_subsample_search_resumes_exactly(models, sub_search, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    s = run(models, store, max_time_s=1e-6)  # stops after generation 0 (resumable), re-scores its top
    assert s["stop_reason"].startswith("max_time")
    assert len(Storage(str(store)).read_history()) == 6
    run(models, store, resume=True)
    assert comparable(Storage(str(store)).read_history()) == comparable(Storage(str(sub_search)).read_history())
    final = [json.loads((p / "subsample_agreement.json").read_text())["final"] for p in (store, sub_search)]
    assert final[0] == final[1]


@pytest.mark.slow
def test_lm_eval_scores_the_drawn_examples(tmp_path):
    """On a demo model: the subsample score is the mean of the full run's per-example results over the draw."""
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolve.demo_models import DEFAULT_OUT, ensure_demo_models
    from evolve.scoring import run_lm_eval, task_manager

    root = ensure_demo_models(Path(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT), seed=0,
                              log=lambda *_: None)
    torch.set_num_threads(1)
    path = str(root / "ft_arith")
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
              tokenizer=AutoTokenizer.from_pretrained(path), batch_size=64, add_bos_token=True)
    task_dir = str(Path(__file__).resolve().parents[1] / "configs" / "evolve" / "tasks")
    tm = task_manager([task_dir], ["demo_arith"])
    tasks = [{"name": "demo_arith", "weight": 1.0, "metric": "exact_match,none"}]
    ev = {"limit": 40}
    draw = {"size": 12, "seed": 0, "round": 2}
    cheap = run_lm_eval(lm, tasks, ev, tm, subsample=draw)["demo_arith"]
    full = evaluate(lm=lm, task_dict=tm.load(["demo_arith"]), limit=40, log_samples=True, bootstrap_iters=0)
    per_doc = {s["doc_id"]: s["exact_match"] for s in full["samples"]["demo_arith"]}
    idx = samples_for({"demo_arith": 200}, draw, limit=40)["demo_arith"]
    assert len(per_doc) == 40 and len(idx) == 12 and max(idx) < 40
    assert cheap == pytest.approx(np.mean([per_doc[i] for i in idx]))


def test_ties_in_the_cheap_score_are_broken_by_candidate_never_by_finishing_order():
    """Which of equally scored candidates is re-scored, or stands for its score vector on a Pareto front, must
    not depend on which evaluator finished first (it differs between a run and its resume)."""
    from evolve.pareto import pareto_front
    from evolve.subsample import top_candidates

    def rec(g, i, score, n):
        return {"id": f"g{g:03d}-{i:02d}", "generation": g, "index": i, "status": "ok", "score": score,
                "scores": {"a": score, "b": 1.0}, "eval_number": n}

    history = [rec(0, 3, 1.0, 1), rec(0, 1, 1.0, 2), rec(1, 0, 1.0, 3), rec(0, 2, 0.5, 4)]
    for order in (history, history[::-1]):
        for n, r in enumerate(order):
            r["eval_number"] = n + 1  # any finishing order
        assert [r["id"] for r in top_candidates(order, 2)] == ["g000-01", "g000-03"]
        tasks = [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}]
        assert [r["id"] for r in pareto_front(order, tasks)] == ["g000-01"]
