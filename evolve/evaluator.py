"""The evaluator: one per GPU (or CPU slot), run as a Ray actor by evolve.search.

Each evaluator keeps the input models' tensors resident (one ``ResidentLoader`` cache shared by every
candidate's plan), builds each candidate in memory (plan the recipe, ``merge_in_memory``) and swaps the
weights into one model instantiated once — no model is written to disk per candidate — then scores it with
lm-eval through its backend (evolve.backends: ``hf`` or ``vllm``).

The actor runs ``in_flight`` calls at once (a threaded actor): while one candidate is being scored, the next
is being merged, so the model is never left waiting for a merge. Building and scoring each hold their own
lock, so at most one candidate builds and one scores at a time.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Optional

import torch

from evolve.backends import make_backend
from evolve.backends.common import resolve_device
from evolve.stages import is_staged, plan_stages
from ray_merge.execute.loaders import ResidentLoader
from ray_merge.execute.stream import merge_in_memory
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict


class CandidateBuilder:
    """Plans and merges recipes in memory; input tensors are read once and kept resident."""

    def __init__(self, seed: Optional[int], device: str = "cpu", allow_crimes: bool = False):
        self.seed = seed
        self.device = device
        self.allow_crimes = allow_crimes
        self.cache: dict = {}  # (model path, tensor name) -> tensor: shared by every candidate's loader

    def plan(self, recipe: dict, source: str = "<candidate>"):
        return plan_recipe(recipe_from_dict(recipe, source=source), allow_crimes=self.allow_crimes, seed=self.seed)

    def build(self, recipe, source: str = "<candidate>"):
        """(state dict, plan) of the merged candidate. A multi-stage candidate (a list of recipes, evolve.stages)
        is merged stage by stage in memory, each stage reading the earlier ones' tensors from memory; the
        result is the last stage's."""
        if is_staged(recipe):
            return self._build_stages(recipe, source)
        plan = self.plan(recipe, source)
        loader = ResidentLoader(plan)
        loader.cache = self.cache
        return merge_in_memory(plan, loader, device=self.device), plan

    def _build_stages(self, recipe: list, source: str):
        merged: dict = {}  # stage name -> its state dict, while later stages need it
        sd, plan = None, None
        for name, plan in plan_stages(recipe, source=source, seed=self.seed, allow_crimes=self.allow_crimes):
            loader = ResidentLoader(plan, in_memory=merged)
            loader.cache = self.cache
            sd = merge_in_memory(plan, loader, device=self.device)
            if name is not None:
                merged[name] = sd
        return sd, plan

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


class Evaluator:
    """Builds and scores candidates. Wrapped with ``ray.remote`` by evolve.search (threaded actor)."""

    def __init__(self, spec: dict, worker: str):
        self.spec = spec
        self.worker = worker
        ev = spec["evaluation"]
        threads = ev.get("torch_threads") or max(1, int(ev.get("num_cpus") or 1))
        torch.set_num_threads(threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.builder = CandidateBuilder(spec.get("seed"), resolve_device(ev.get("merge_device", "cpu")),
                                        allow_crimes=spec.get("allow_crimes", False))
        self._build_lock = threading.Lock()
        self._eval_lock = threading.Lock()
        self._scratch = tempfile.mkdtemp(prefix="rm-evolve-")
        self.backend = None
        self.stats_ = {"built": 0, "evaluated": 0, "failed": 0, "build_s": 0.0, "eval_s": 0.0}

    def setup(self) -> dict:
        """Read the inputs, instantiate the model and the lm-eval wrapper (once). Returns a description."""
        t0 = time.time()
        sd, plan = self.builder.build(self.spec["first_recipe"], source="<first candidate>")
        self.backend = make_backend(self.spec["evaluation"], self.spec["tasks"], plan, sd, self._scratch)
        del sd
        return {"worker": self.worker, "node": socket.gethostname(), "pid": os.getpid(),
                "backend": self.backend.name, "device": getattr(self.backend, "device", "cpu"),
                "setup_s": time.time() - t0, "resident_bytes": self.builder.resident_bytes}

    def evaluate(self, cid: str, recipe: dict, subsample: Optional[dict] = None) -> dict:
        """Build and score one candidate; ``subsample`` ({size, seed, round}): score it on that draw of each
        task's examples (evolve.subsample) instead of the full sets."""
        t_submit = time.time()
        with self._build_lock:
            t_b0 = time.time()
            sd, _ = self.builder.build(recipe, source=f"<candidate {cid}>")
            t_b1 = time.time()
            self.stats_["built"] += 1
            self.stats_["build_s"] += t_b1 - t_b0
        with self._eval_lock:
            t_e0 = time.time()
            try:
                self.backend.load(sd)
                del sd
                scores = self.backend.score(subsample) if subsample is not None else self.backend.score()
            except BaseException:
                self.stats_["failed"] += 1
                raise
            finally:
                t_e1 = time.time()
                self.stats_["eval_s"] += t_e1 - t_e0
            self.stats_["evaluated"] += 1
        return {"scores": scores, "worker": self.worker, "node": socket.gethostname(),
                "timings": {"start": t_submit, "build_s": t_b1 - t_b0, "wait_s": t_e0 - t_b1,
                            "eval_s": t_e1 - t_e0, "eval_start": t_e0, "eval_end": t_e1}}

    def stats(self) -> dict:
        return dict(self.stats_, worker=self.worker)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        shutil.rmtree(self._scratch, ignore_errors=True)
