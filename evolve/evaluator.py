"""The evaluator: one per GPU (or CPU slot), run as a Ray actor by evolve.search.

Each evaluator keeps the input models' tensors resident (one ``executor.ResidentLoader`` cache shared by
every candidate's plan), builds each candidate in memory (plan the recipe, ``merge_in_memory``) and swaps
the weights into one model instantiated once — no model is written to disk per candidate — then scores it
with lm-eval. Two backends:

- ``hf``: lm-eval's ``HFLM`` wrapping the in-memory ``transformers`` model (``load_state_dict`` per candidate);
- ``vllm``: a vLLM engine in vLLM's own venv, weights swapped in place (evolve/vllm_backend.py).

The actor runs ``in_flight`` calls at once (a threaded actor): while one candidate is being scored, the next
is being merged, so the model is never left waiting for a merge. Building and scoring each hold their own
lock, so at most one candidate builds and one scores at a time.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from typing import Any, Optional

log = logging.getLogger("ray_merge.evolve")


# --------------------------------------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------------------------------------
def task_manager(include_paths: list[str], task_names: list[str]):
    """A TaskManager that knows ``task_names``: the include paths alone when they hold every task (indexing
    lm-eval's thousands of built-in tasks takes seconds), else the built-in tasks too."""
    from lm_eval.tasks import TaskManager

    if include_paths:
        tm = TaskManager(include_path=list(include_paths), include_defaults=False)
        if all(t in tm.all_tasks for t in task_names):
            return tm
    tm = TaskManager(include_path=list(include_paths) or None)
    missing = [t for t in task_names if t not in tm.all_tasks]
    if missing:
        where = f" (include paths: {', '.join(include_paths)})" if include_paths else ""
        raise ValueError(f"lm-eval knows no task {missing[0]!r}{where}")
    return tm


# lm-eval options that pass through `evaluation.lm_eval`: evaluate()'s own, and the ones simple_evaluate() would
# apply to the tasks before calling it (seeds, generation kwargs).
EVALUATE_ARGS = ("samples", "cache_requests", "rewrite_requests_cache", "bootstrap_iters", "write_out",
                 "log_samples", "confirm_run_unsafe_code")
PREPARE_ARGS = ("gen_kwargs", "random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
LM_EVAL_ARGS = EVALUATE_ARGS + PREPARE_ARGS


def run_lm_eval(lm, tasks: list[dict], ev: dict, tm) -> dict[str, float]:
    """Score ``lm`` on the search's tasks; return {task: metric value}.

    This is ``lm_eval.simple_evaluate`` without its per-call environment report (which runs ``pip list`` in a
    subprocess: most of the time of a small evaluation): the same seeding and task set-up, then lm-eval's
    public ``lm_eval.evaluator.evaluate``.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    opts = dict(ev.get("lm_eval") or {})
    seed = opts.pop("random_seed", 0)
    if seed is not None:
        random.seed(seed)
    np_seed = opts.pop("numpy_random_seed", 1234)
    if np_seed is not None:
        np.random.seed(np_seed)
    torch_seed = opts.pop("torch_random_seed", 1234)
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    fewshot_seed = opts.pop("fewshot_random_seed", 1234)
    gen_kwargs = opts.pop("gen_kwargs", None)
    if isinstance(gen_kwargs, str):
        from lm_eval.utils import simple_parse_args_string

        gen_kwargs = simple_parse_args_string(gen_kwargs) or None
    num_fewshot = ev.get("num_fewshot")
    loaded = tm.load([t["name"] for t in tasks])
    for task_obj in loaded["tasks"].values():
        if gen_kwargs and task_obj.get_config("output_type") == "generate_until":
            task_obj.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
        if num_fewshot is not None:
            if task_obj.get_config("num_fewshot") != 0:  # a task that fixes 0 shots keeps it (as lm-eval does)
                task_obj.set_config(key="num_fewshot", value=num_fewshot)
        elif task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=fewshot_seed)
    kwargs: dict[str, Any] = dict(bootstrap_iters=0, log_samples=False)
    kwargs.update(opts)
    results = evaluate(
        lm=lm,
        task_dict=loaded,
        limit=ev.get("limit"),
        apply_chat_template=ev.get("apply_chat_template", False),
        fewshot_as_multiturn=ev.get("fewshot_as_multiturn", False),
        system_instruction=ev.get("system_instruction"),
        **kwargs,
    )
    per_task = results["results"]
    out = {}
    for t in tasks:
        got = per_task.get(t["name"], {})
        if t["metric"] not in got:
            keys = sorted(k for k in got if k != "alias")
            raise KeyError(f"task {t['name']} has no metric {t['metric']!r} (it has: {', '.join(keys)})")
        out[t["name"]] = float(got[t["metric"]])
    return out


def combined_score(scores: dict[str, float], tasks: list[dict]) -> float:
    return float(sum(t["weight"] * scores[t["name"]] for t in tasks))


# --------------------------------------------------------------------------------------------------------
# building candidates
# --------------------------------------------------------------------------------------------------------
class CandidateBuilder:
    """Plans and merges recipes in memory; input tensors are read once and kept resident."""

    def __init__(self, seed: Optional[int], device: str = "cpu", allow_crimes: bool = False):
        self.seed = seed
        self.device = device
        self.allow_crimes = allow_crimes
        self.cache: dict = {}  # (model path, tensor name) -> tensor: shared by every candidate's loader

    def plan(self, recipe: dict, source: str = "<candidate>"):
        from ray_merge.planner.plan import plan_recipe
        from ray_merge.recipe.load import recipe_from_dict

        return plan_recipe(recipe_from_dict(recipe, source=source), allow_crimes=self.allow_crimes, seed=self.seed)

    def build(self, recipe: dict, source: str = "<candidate>"):
        """(state dict, plan) of the merged candidate."""
        from ray_merge.execute.loaders import ResidentLoader
        from ray_merge.execute.stream import merge_in_memory

        plan = self.plan(recipe, source)
        loader = ResidentLoader(plan)
        loader.cache = self.cache
        return merge_in_memory(plan, loader, device=self.device), plan

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def tokenizer_dir(plan, scratch: str) -> str:
    """Where the candidates' tokenizer is: the donor's, or the one the recipe's tokenizer settings build."""
    from ray_merge.output.tokenizer import tokenizer_writer

    writer = tokenizer_writer(plan, True)
    if writer is None:
        return plan.models[plan.donor].path
    out = os.path.join(scratch, "tokenizer")
    os.makedirs(out, exist_ok=True)
    writer(out)
    return out


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFBackend:
    """lm-eval's HFLM on a transformers model instantiated once; candidates are swapped in with
    ``load_state_dict``."""

    name = "hf"

    def __init__(self, ev: dict, tasks: list[dict], plan, first_sd: dict, scratch: str):
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.ev = ev
        self.tasks = tasks
        self.device = resolve_device(ev.get("device", "auto"))
        cfg_dict = dict(plan.out_config)
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        dtype_name = ev.get("dtype", "float32")
        dtype = getattr(torch, dtype_name) if dtype_name != "auto" else next(iter(first_sd.values())).dtype
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        self.model = model.to(self.device).eval()
        model_keys = set(self.model.state_dict())
        unexpected = sorted(set(first_sd) - model_keys)
        if unexpected:
            raise ValueError(f"merged tensors the model does not have: {unexpected[:3]}")
        self.allowed_missing = model_keys - set(first_sd)  # tied weights and non-persistent buffers
        self.load(first_sd)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(plan, scratch))
        args = dict(ev.get("model_args") or {})
        self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=ev.get("batch_size", 32), **args)
        self.tm = task_manager(ev.get("include_paths") or [], [t["name"] for t in tasks])

    def load(self, sd: dict) -> None:
        import torch

        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
        bad = set(missing) - self.allowed_missing
        if unexpected or bad:
            raise ValueError(f"candidate state dict does not fit the model: missing {sorted(bad)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        if self.allowed_missing and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def score(self) -> dict[str, float]:
        return run_lm_eval(self.lm, self.tasks, self.ev, self.tm)

    def close(self) -> None:
        pass


def make_backend(ev: dict, tasks: list[dict], plan, first_sd: dict, scratch: str):
    if ev.get("backend", "hf") == "vllm":
        from evolve.vllm_backend import VLLMBackend

        return VLLMBackend(ev, tasks, plan, first_sd, scratch)
    return HFBackend(ev, tasks, plan, first_sd, scratch)


# --------------------------------------------------------------------------------------------------------
# the actor
# --------------------------------------------------------------------------------------------------------
class InjectedFailure(RuntimeError):
    """Raised by the test-only failure hook (RAY_MERGE_EVOLVE_INJECT_FAILURE)."""


def parse_injection(spec: Optional[str]) -> dict[str, tuple[int, str]]:
    """``ID[:N[:MODE]],...`` -> {id: (attempts that fail, mode)}; MODE is ``raise`` (default), ``exit`` (the
    evaluator process dies) or ``hang``."""
    out = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        n = int(parts[1]) if len(parts) > 1 and parts[1] else 99
        mode = parts[2] if len(parts) > 2 else "raise"
        out[parts[0]] = (n, mode)
    return out


class Evaluator:
    """Builds and scores candidates. Wrapped with ``ray.remote`` by evolve.search (threaded actor)."""

    def __init__(self, spec: dict, worker: str, inject: Optional[str] = None):
        import torch

        self.spec = spec
        self.worker = worker
        self.inject = parse_injection(inject)
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

    def evaluate(self, cid: str, recipe: dict, attempt: int = 1) -> dict:
        t_submit = time.time()
        n_fail, mode = self.inject.get(cid, (0, "raise"))
        with self._build_lock:
            t_b0 = time.time()
            sd, _ = self.builder.build(recipe, source=f"<candidate {cid}>")
            t_b1 = time.time()
            self.stats_["built"] += 1
            self.stats_["build_s"] += t_b1 - t_b0
        with self._eval_lock:
            t_e0 = time.time()
            try:
                if attempt <= n_fail:
                    if mode == "exit":
                        os._exit(3)
                    if mode == "hang":  # until killed (tests kill the search mid-generation with it)
                        time.sleep(3600)
                    raise InjectedFailure(f"injected failure of {cid} (attempt {attempt}) on {self.worker}")
                self.backend.load(sd)
                del sd
                scores = self.backend.score()
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
        import shutil

        shutil.rmtree(self._scratch, ignore_errors=True)


def format_exception(e: BaseException) -> str:
    """The innermost error of a (Ray-wrapped) exception as one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = " ".join(str(e).split())
    if not text:
        text = "".join(traceback.format_exception_only(type(e), e)).strip()
    return f"{type(e).__name__}: {text}"[:500]
