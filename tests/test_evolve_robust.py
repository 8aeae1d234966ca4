"""Evolution at scale, end to end on the CPU demo models (Ray, lm-eval): a hung evaluation times out, is
retried on another evaluator and then recorded as failed while the generation completes; the wall-clock
budget and patience stop a search (resumable); the report is refreshed after every generation; TensorBoard
event files are written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_evolve_search import demo_models, env, history, write_config  # noqa: F401  (demo_models: a fixture)

pytestmark = pytest.mark.slow

# `python DRIVER CONFIG STORAGE RUN_OPTIONS_JSON [KEY=VALUE ...]`: the search with an evaluator that hangs as
# HANGS says (candidate id -> attempts that hang), and every report it writes noted in REPORTS (one JSON line
# per write_report call: the stop reason it shows, the evaluations in the history, whether progress.png is there).
DRIVER = """
import json
import os
import sys
import time

import evolve.search
from evolve.config import load_config
from evolve.evaluator import Evaluator
from evolve.search import RunOptions, run_search

HANGS = {hangs!r}
ATTEMPTS = {attempts!r}
REPORTS = {reports!r}


class HangingEvaluator(Evaluator):
    def evaluate(self, cid, recipe):
        if cid in HANGS:
            attempt = sum(name.startswith(cid + ".") for name in os.listdir(ATTEMPTS)) + 1
            open(os.path.join(ATTEMPTS, f"{{cid}}.{{attempt}}"), "w").close()
            if attempt <= HANGS[cid]:
                time.sleep(3600)
        return super().evaluate(cid, recipe)


def noting_report(storage, genome, cfg, summary):
    text = write_report(storage, genome, cfg, summary)
    with open(REPORTS, "a") as f:
        f.write(json.dumps({{"stop_reason": summary.get("stop_reason"), "evaluations": len(storage.read_history()),
                            "progress": os.path.exists(storage.file("progress.png"))}}) + "\\n")
    return text


write_report = evolve.search.write_report
evolve.search.write_report = noting_report

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[4:])
    run_search(cfg, sys.argv[2], RunOptions(**json.loads(sys.argv[3])), evaluator_cls=HangingEvaluator)
"""


def run_driver(tmp: Path, cfg: Path, store: Path, hangs: dict, options: dict, *overrides: str):
    attempts = tmp / "attempts"
    attempts.mkdir(exist_ok=True)
    reports = tmp / "reports.jsonl"
    if reports.exists():
        reports.unlink()
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(hangs=hangs, attempts=str(attempts), reports=str(reports)))
    proc = subprocess.run([sys.executable, str(driver), str(cfg), str(store), json.dumps(options), *overrides],
                          capture_output=True, text=True, env=dict(os.environ, **env()), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in reports.read_text().splitlines()]


def test_hung_evaluation_times_out_is_retried_then_recorded_as_failed(demo_models, tmp_path):  # noqa: F811
    cfg = write_config(tmp_path / "search.yml", demo_models, max_fevals=4)
    store = tmp_path / "store"
    proc, _ = run_driver(tmp_path, cfg, store, {"g000-01": 1, "g000-02": 2}, {},
                         "evaluation.timeout_s=25", "evaluation.in_flight=1")
    recs = {r["id"]: r for r in history(store)}
    assert sorted(recs) == [f"g000-{i:02d}" for i in range(4)]  # the generation completed
    once = recs["g000-01"]
    assert once["status"] == "ok" and len(once["attempts"]) == 2
    assert once["attempts"][0]["error"] == "timed out after 25 s"
    assert once["attempts"][1]["worker"] != once["attempts"][0]["worker"]
    twice = recs["g000-02"]
    assert twice["status"] == "failed" and twice["error"] == "timed out after 25 s"
    assert len(twice["attempts"]) == 2 and twice["attempts"][0]["worker"] != twice["attempts"][1]["worker"]
    assert recs["g000-00"]["status"] == "ok" and recs["g000-03"]["status"] == "ok"
    assert proc.stderr.count("hung on candidate") == 3  # each hung evaluator killed and replaced
    assert sorted(os.listdir(tmp_path / "attempts")) == ["g000-01.1", "g000-01.2", "g000-02.1", "g000-02.2"]


def test_max_time_then_patience_stop_with_live_report_and_tensorboard(demo_models, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "search.yml", demo_models, max_fevals=40)
    store = tmp_path / "store"
    # a budget of 1 s: the search stops after its first generation, checkpointed
    _, reports = run_driver(tmp_path, cfg, store, {}, {}, "search.max_time_s=1")
    assert len(history(store)) == 4
    live, final = reports
    assert live["stop_reason"].startswith("max_time") and live["evaluations"] == 4 and live["progress"]
    assert final["stop_reason"].startswith("max_time")
    assert "stopped: max_time" in (store / "summary.txt").read_text()
    assert (store / "checkpoint.npz").exists()

    # resumed without a budget but with patience 1: it stops at the first generation without a better best
    proc, reports = run_driver(tmp_path, cfg, store, {}, {"resume": True}, "search.patience=1")
    assert "resuming at generation 1: 4 evaluation(s)" in proc.stderr
    recs = history(store)
    gens = sorted({r["generation"] for r in recs})
    assert len(recs) == 4 * len(gens) < 40
    last = gens[-1]
    best_before = max(r["score"] for r in recs if r["generation"] < last and r["status"] == "ok")
    assert all(r["score"] is None or r["score"] <= best_before for r in recs if r["generation"] == last)
    assert all(max(r["score"] for r in recs if r["generation"] == g) > max(
        r["score"] for r in recs if r["generation"] < g) for g in gens[1:-1])  # the others improved
    # the report after every generation: "running" while the search goes on, then the stop reason
    assert [r["stop_reason"] == "running" for r in reports[:-2]] == [True] * (len(gens) - 2)
    assert reports[-2]["stop_reason"].startswith("patience") and reports[-1]["stop_reason"].startswith("patience")
    assert [r["evaluations"] for r in reports[:-1]] == [4 * (g + 1) for g in gens[1:]]
    assert "stopped: patience" in (store / "summary.txt").read_text()

    # TensorBoard: per evaluation and per generation, over both sessions
    acc = EventAccumulator(str(store / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/demo_arith", "eval/demo_reverse", "eval/score", "eval/best_so_far", "generation/demo_arith",
            "generation/score", "generation/best_so_far"} <= tags
    ok = sorted(r["eval_number"] for r in recs if r["status"] == "ok")
    assert sorted(e.step for e in acc.Scalars("eval/score")) == ok
    assert sorted(e.step for e in acc.Scalars("generation/best_so_far")) == gens
    best = max(r["score"] for r in recs if r["status"] == "ok")
    assert max(e.value for e in acc.Scalars("eval/best_so_far")) == pytest.approx(best)
