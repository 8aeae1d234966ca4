"""Evolutionary search end to end on the CPU demo models: Ray evaluators, lm-eval, storage, resume, failures.

The demo models (evolve/demo_models.py) are built once into $RAY_MERGE_DEMO_MODELS, or demo_models/
in the repository (a few CPU minutes the first time, then reused).

Failures are injected by a subclass of the evaluator actor, defined in a small driver script that the tests
write and run (``run_search(..., evaluator_cls=FaultyEvaluator)``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import load_dir, run_cli

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "configs" / "evolve" / "tasks"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_models() -> Path:
    import cma  # noqa: F401
    import lm_eval  # noqa: F401

    from evolve.demo_models import DEFAULT_OUT, ensure_demo_models

    out = Path(os.environ.get("RAY_MERGE_DEMO_MODELS") or DEFAULT_OUT)
    return ensure_demo_models(out, seed=0, log=lambda *_: None)


def write_config(path: Path, models: Path, **search) -> Path:
    conf = {
        "name": "test",
        "genome": {"models": [str(models / "ft_arith"), str(models / "ft_reverse")],
                   "base_model": str(models / "base"), "merge_method": "task_arithmetic",
                   "layer_granularity": 2, "parameters": {"density": 1.0, "weight": {"min": 0.0, "max": 1.5}}},
        "tasks": [{"name": "demo_arith", "metric": "exact_match,none"},
                  {"name": "demo_reverse", "metric": "exact_match,none"}],
        "search": {"popsize": 4, "max_fevals": 8, "seed": 0, **search},
        "evaluation": {"limit": 12, "batch_size": 64, "include_paths": [str(TASK_DIR)], "workers": 2,
                       "model_args": {"add_bos_token": True}, "score_inputs": False},
    }
    path.write_text(yaml.safe_dump(conf))
    return path


def env(**extra) -> dict:
    e = {"RAY_TMPDIR": "/tmp", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    e.update(extra)
    return e


def history(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "history.jsonl").read_text().splitlines()]


# `python DRIVER CONFIG STORAGE [KEY=VALUE ...]`: the search as `ray-merge evolve CONFIG --storage-path STORAGE
# --set KEY=VALUE ...` runs it, with an evaluator that fails as FAILURES says. Ray ships the evaluator class
# to the actors by value (it is defined in __main__).
DRIVER = """
import os
import sys
import time

from evolve.config import load_config
from evolve.evaluator import Evaluator
from evolve.search import RunOptions, run_search

FAILURES = {failures!r}  # candidate id -> (attempts that fail, how: raise, exit or hang)
ATTEMPTS = {attempts!r}  # one file per attempt at a candidate of FAILURES: shared by every evaluator


class InjectedFailure(RuntimeError):
    pass


class FaultyEvaluator(Evaluator):
    def evaluate(self, cid, recipe):
        if cid in FAILURES:
            attempt = sum(name.startswith(cid + ".") for name in os.listdir(ATTEMPTS)) + 1
            open(os.path.join(ATTEMPTS, f"{{cid}}.{{attempt}}"), "w").close()
            n_fail, how = FAILURES[cid]
            if attempt <= n_fail:
                if how == "exit":  # the evaluator process dies
                    os._exit(3)
                if how == "hang":  # until killed
                    time.sleep(3600)
                raise InjectedFailure(f"injected failure of {{cid}} (attempt {{attempt}}) on {{self.worker}}")
        return super().evaluate(cid, recipe)


if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[3:])
    run_search(cfg, sys.argv[2], RunOptions(), evaluator_cls=FaultyEvaluator)
"""


def faulty_search(tmp: Path, cfg: Path, store: Path, failures: dict, *overrides: str) -> list[str]:
    """The command line that runs the search with ``failures`` injected (see DRIVER)."""
    attempts = tmp / "attempts"
    attempts.mkdir()
    driver = tmp / "faulty_search.py"
    driver.write_text(DRIVER.format(failures=failures, attempts=str(attempts)))
    return [sys.executable, str(driver), str(cfg), str(store), *overrides]


@pytest.fixture(scope="module")
def search_with_failures(demo_models, tmp_path_factory):
    """A short search in which g000-01 fails once, g000-02 fails twice, and g001-00 kills its evaluator."""
    tmp = tmp_path_factory.mktemp("evsearch")
    cfg = write_config(tmp / "search.yml", demo_models)
    store = tmp / "store"
    failures = {"g000-01": (1, "raise"), "g000-02": (2, "raise"), "g001-00": (1, "exit")}
    args = faulty_search(tmp, cfg, store, failures, "evaluation.score_inputs=true")
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, **env()), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"store": store, "proc": proc, "cfg": cfg, "tmp": tmp}


def test_short_search_writes_history_checkpoint_best_config_and_plots(search_with_failures):
    store = search_with_failures["store"]
    recs = history(store)
    assert len(recs) == 8 and len({r["id"] for r in recs}) == 8
    for name in ("checkpoint.npz", "best_config.yml", "best.json", "progress.png", "best_params.png",
                 "summary.txt", "config.yml", "inputs.jsonl"):
        assert (store / name).stat().st_size > 0, name
    ok = [r for r in recs if r["status"] == "ok"]
    assert all(set(r["scores"]) == {"demo_arith", "demo_reverse"} for r in ok)
    assert all(r["timings"]["eval_s"] > 0 and r["worker"].startswith("eval-") for r in ok)
    assert all(len(r["genotype"]) == 4 for r in recs)  # weight x 2 models x 2 layer groups
    best = json.loads((store / "best.json").read_text())
    assert best["score"] == max(r["score"] for r in ok)
    inputs = [json.loads(line) for line in (store / "inputs.jsonl").read_text().splitlines()]
    assert {r["id"] for r in inputs} == {"input:base", "input:ft_arith", "input:ft_reverse"}
    summary = (store / "summary.txt").read_text()
    assert "best merge" in summary and "candidates/min" in summary
    assert "ray-merge evolve: test" in search_with_failures["proc"].stdout  # the summary, printed at the end


def test_failed_evaluation_is_retried_on_another_evaluator_then_recorded(search_with_failures):
    recs = {r["id"]: r for r in history(search_with_failures["store"])}
    once = recs["g000-01"]
    assert once["status"] == "ok" and len(once["attempts"]) == 2
    assert "InjectedFailure" in once["attempts"][0]["error"]
    assert once["attempts"][1]["worker"] != once["attempts"][0]["worker"]
    twice = recs["g000-02"]
    assert twice["status"] == "failed" and twice["score"] is None and len(twice["attempts"]) == 2
    assert "injected failure of g000-02" in twice["error"]
    assert twice["attempts"][0]["worker"] != twice["attempts"][1]["worker"]
    died = recs["g001-00"]  # its evaluator process exited: replaced, and the candidate retried elsewhere
    assert died["status"] == "ok" and "died" in died["attempts"][0]["error"]
    assert "died; starting" in search_with_failures["proc"].stderr


def test_best_config_runs_unchanged_and_reproduces_the_in_memory_candidate(search_with_failures, tmp_path):
    import torch

    from evolve.evaluator import CandidateBuilder

    store = search_with_failures["store"]
    out = tmp_path / "merged"
    proc = run_cli("run", store / "best_config.yml", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    best = json.loads((store / "best.json").read_text())
    recipe = next(r for r in history(store) if r["id"] == best["id"])["recipe"]
    assert yaml.safe_load((store / "best_config.yml").read_text()) == recipe
    sd, _ = CandidateBuilder(seed=0).build(recipe)
    on_disk = load_dir(out)
    assert set(on_disk) == set(sd)
    for k in sd:
        assert torch.equal(on_disk[k], sd[k]), k
    # and the merged model scores as the search said it did
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolve.demo_eval import score_model

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    scores = score_model(model, AutoTokenizer.from_pretrained(out), ["demo_arith", "demo_reverse"], limit=12)
    assert scores == pytest.approx(best["scores"], abs=1e-9)


def test_kill_and_resume_loses_and_repeats_nothing(demo_models, tmp_path):
    cfg = write_config(tmp_path / "search.yml", demo_models)
    store = tmp_path / "store"
    # g001-02 hangs: the search is killed while generation 1 has 3 of its 4 candidates in the history
    args = faulty_search(tmp_path, cfg, store, {"g001-02": (1, "hang")})
    ray_tmp = tempfile.mkdtemp(prefix="rmk", dir="/tmp")  # the killed Ray instance's files (short: socket paths)
    full_env = dict(os.environ, **env(RAY_TMPDIR=ray_tmp))
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hist = store / "history.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if hist.exists() and len(hist.read_text().splitlines()) >= 7:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray instance, its evaluators: a crash
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    before = history(store)
    assert sorted(r["id"] for r in before[4:]) == ["g001-00", "g001-01", "g001-03"]  # in finishing order
    proc2 = run_cli("evolve", cfg, "--storage-path", store, "--resume", env=env(), timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    after = history(store)
    ids = [r["id"] for r in after]
    assert len(after) == 8 and len(set(ids)) == 8  # nothing lost, nothing evaluated twice
    assert after[:7] == before  # finished evaluations kept as they were
    assert ids[7] == "g001-02" and after[7]["session"] != before[0]["session"]
    assert "resuming at generation 1: 7 evaluation(s)" in proc2.stderr
    # resuming a finished search evaluates nothing more (and starts no Ray)
    proc3 = run_cli("evolve", cfg, "--storage-path", store, "--resume", "--no-report", env=env(), timeout=600)
    assert proc3.returncode == 0, proc3.stderr[-2000:]
    assert "nothing left to evaluate" in proc3.stderr and len(history(store)) == 8
    # ... unless the budget is raised: then it goes on from the checkpoint
    proc4 = run_cli("evolve", cfg, "--storage-path", store, "--resume", "--no-report", "--max-fevals", "12",
                    env=env(), timeout=600)
    assert proc4.returncode == 0, proc4.stderr[-2000:]
    ids = [r["id"] for r in history(store)]
    assert len(ids) == 12 and len(set(ids)) == 12 and sorted(ids[8:]) == [f"g002-{i:02d}" for i in range(4)]
