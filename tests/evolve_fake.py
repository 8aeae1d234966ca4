"""A stand-in evaluator for fast search tests: it scores a recipe without building a model or running lm-eval.

Each task has ``N_DOCS`` "examples"; example j is answered right when the recipe's quality on the task
exceeds a threshold u_j fixed per task. The quality is the share of the merge weight given to the task's
model (task i: model i), so the tasks pull against each other and the front is a curve. A subsample scores
the examples evolve.subsample picks, as the lm-eval evaluator does, so cheap and full scores differ the way
they would on a real task.

Ray's workers cannot import the tests: ``use_by_value`` makes Ray ship this module by value.
"""
from __future__ import annotations

import os
import sys
import time
import zlib

import numpy as np

from evolve.subsample import samples_for

N_DOCS = 60


def use_by_value() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def model_weights(recipe: dict) -> list[float]:
    """Total merge weight per input model, in the order the models first appear in the recipe."""
    totals: dict[str, float] = {}

    def walk(node):
        if isinstance(node, dict):
            if "model" in node and isinstance(node.get("parameters"), dict):
                w = node["parameters"].get("weight")
                if isinstance(w, (int, float)):
                    totals[node["model"]] = totals.get(node["model"], 0.0) + float(w)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(recipe)
    return list(totals.values())


def fake_scores(recipe: dict, tasks: list[dict], subsample=None) -> dict[str, float]:
    w = np.asarray(model_weights(recipe)) + 1e-9
    share = w / w.sum()
    out = {}
    for i, t in enumerate(tasks):
        u = np.random.default_rng(zlib.crc32(t["name"].encode())).uniform(size=N_DOCS)
        idx = samples_for({t["name"]: N_DOCS}, subsample)[t["name"]] if subsample else list(range(N_DOCS))
        q = np.sqrt(share[i % len(share)])
        out[t["name"]] = float(np.mean(u[idx] < q))
    return out


class FakeEvaluator:
    """The evaluator actor's interface (evolve.evaluator.Evaluator) without torch: actors start fast."""

    def __init__(self, spec: dict, worker: str):
        self.spec = spec
        self.worker = worker
        self.stats_ = {"built": 0, "evaluated": 0, "failed": 0, "build_s": 0.0, "eval_s": 0.0}

    def stats(self) -> dict:
        return dict(self.stats_, worker=self.worker)

    def close(self) -> None:
        pass

    def setup(self) -> dict:
        return {"worker": self.worker, "node": "test", "pid": os.getpid(), "backend": "fake", "device": "cpu",
                "setup_s": 0.0, "resident_bytes": 0}

    def evaluate(self, cid: str, recipe: dict, subsample=None) -> dict:
        t0 = time.time()
        scores = fake_scores(recipe, self.spec["tasks"], subsample)
        self.stats_["evaluated"] += 1
        t1 = time.time()
        return {"scores": scores, "worker": self.worker, "node": "test",
                "timings": {"start": t0, "build_s": 0.0, "wait_s": 0.0, "eval_s": t1 - t0, "eval_start": t0,
                            "eval_end": t1}}


def search_config(models: dict, **search) -> dict:
    """A two-task linear search over two fine-tunes, 4 genes (weight x 2 models x 2 layer groups)."""
    return {"name": "fake", "seed": 0,
            "genome": {"models": [models["a"], models["b"]], "merge_method": "linear", "layer_granularity": 2},
            "tasks": [{"name": "task_a", "metric": "acc,none"}, {"name": "task_b", "metric": "acc,none"}],
            "search": {"popsize": 6, "max_fevals": 18, "seed": 0, **search},
            "evaluation": {"workers": 2, "in_flight": 1, "score_inputs": False}}


def comparable(history: list[dict]) -> list[dict]:
    """History records without what differs between sessions (timings, workers, order of finishing)."""
    keep = ("id", "generation", "index", "status", "genotype", "recipe", "scores", "score", "fitness", "subsample")
    return sorted(({k: r.get(k) for k in keep} for r in history), key=lambda r: r["id"])
