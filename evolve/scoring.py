"""Scoring a model with lm-eval: what the evaluator and every backend share.

``run_lm_eval`` is lm-eval's ``simple_evaluate`` without its per-call environment report; ``task_manager``
finds the search's tasks; ``combined_score`` is the search's fitness (the weighted sum of the task metrics);
``format_exception`` turns a failed evaluation into the one line recorded in the history.
"""
from __future__ import annotations

import random
import traceback
from typing import Any, Optional

import numpy as np
import torch

from evolve.subsample import samples_for


def quiet_datasets() -> None:
    """No "Generating test split" bars: one per task and candidate would bury the search's own progress."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def task_manager(include_paths: list[str], task_names: list[str]):
    """A TaskManager that knows ``task_names``: the include paths alone when they hold every task (indexing
    lm-eval's thousands of built-in tasks takes seconds), else the built-in tasks too."""
    from lm_eval.tasks import TaskManager

    quiet_datasets()
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


def run_lm_eval(lm, tasks: list[dict], ev: dict, tm, subsample: Optional[dict] = None) -> dict[str, float]:
    """Score ``lm`` on the search's tasks; return {task: metric value}.

    ``subsample`` ({size, seed, round}: evolve.subsample): score on that draw of each task's examples (lm-eval's
    ``samples=``, drawn from the first ``evaluation.limit`` examples when a limit is set) instead of all.

    This is ``lm_eval.simple_evaluate`` without its per-call environment report (which runs ``pip list`` in a
    subprocess: most of the time of a small evaluation): the same seeding and task set-up, then lm-eval's
    public ``lm_eval.evaluator.evaluate``.
    """
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
    limit = ev.get("limit")
    if subsample is not None:
        sizes = {name: len(task_obj.eval_docs) for name, task_obj in loaded["tasks"].items()}
        kwargs["samples"] = samples_for(sizes, subsample, limit)
        limit = None  # lm-eval takes one of limit and samples
    results = evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
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


def format_exception(e: BaseException) -> str:
    """The innermost error of a (Ray-wrapped) exception as one line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = " ".join(str(e).split())
    if not text:
        text = "".join(traceback.format_exception_only(type(e), e)).strip()
    return f"{type(e).__name__}: {text}"[:500]
