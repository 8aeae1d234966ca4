"""Score in-memory models on the demo lm-eval tasks.

``score_model`` wraps an already-loaded ``transformers`` model in lm-eval's
``HFLM`` (no save/load round trip) and runs ``lm_eval.simple_evaluate`` on the
tasks in ``configs/evolve/tasks/`` -- the fitness function of the CPU demo of
the evolutionary merge search.

``python -m evolve.demo_eval [--models DIR] [--limit N]`` prints the score
table for base / ft_arith / ft_reverse and two plain-torch merges of the
fine-tunes (building the demo models first if needed).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from evolve.demo_models import ensure_demo_models
from evolve.scoring import quiet_datasets

# The demo never touches the hub; make that explicit before datasets or
# transformers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = REPO_ROOT / "configs" / "evolve" / "tasks"
DEMO_TASKS = ("demo_arith", "demo_reverse")
FINAL_TASKS = ("demo_arith_final", "demo_reverse_final")
DEFAULT_METRIC = "exact_match,none"


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str = str(TASK_DIR), include_defaults: bool = False):
    """A cached ``TaskManager``.  Indexing lm-eval's thousands of built-in
    tasks takes seconds, so by default only ``include_path`` is indexed."""
    from lm_eval.tasks import TaskManager

    quiet_datasets()

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def score_model(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[str] = DEMO_TASKS,
    limit: int | float | None = None,
    batch_size: int = 64,
    metric: str | Mapping[str, str] = DEFAULT_METRIC,
    include_path: str | os.PathLike = TASK_DIR,
    **lm_eval_kwargs: Any,
) -> dict[str, float]:
    """Evaluate an in-memory causal LM with lm-eval; return {task: score}.

    ``metric`` is the key in lm-eval's per-task results ("exact_match,none"
    for the demo tasks), or a {task: key} mapping.  ``lm_eval_kwargs`` go to
    ``lm_eval.simple_evaluate`` (e.g. ``random_seed``, ``gen_kwargs``).
    The model is put in eval mode and left on its device.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        # The demo tokenizer adds <bos> itself; saying so keeps lm-eval from
        # guessing per model family.
        add_bos_token=True,
    )
    kwargs: dict[str, Any] = dict(
        bootstrap_iters=0,  # no stderr bootstrap: seconds per call otherwise
        log_samples=False,
        verbosity="WARNING",
    )
    kwargs.update(lm_eval_kwargs)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=task_manager(str(include_path)),
        **kwargs,
    )
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    per_task = results["results"]
    out = {}
    for task in tasks:
        key = metric if isinstance(metric, str) else metric[task]
        if task not in per_task or key not in per_task[task]:
            raise KeyError(
                f"lm-eval returned no {key!r} for task {task!r}; it has {sorted(per_task.get(task, {}))}"
            )
        out[task] = float(per_task[task][key])
    return out


# --------------------------------------------------------------------------- #
# Demo table
# --------------------------------------------------------------------------- #


def merge_state_dicts(base: Mapping, others: list[Mapping], weights: list[float]) -> dict:
    """``base + sum_i w_i (other_i - base)``: task arithmetic; the linear
    average when the weights sum to one."""
    return {k: b + sum(w * (o[k] - b) for o, w in zip(others, weights)) for k, b in base.items()}


def demo_table(models_dir: Path, tasks: Iterable[str], limit: int | None, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "base")
    loaded = {
        name: AutoModelForCausalLM.from_pretrained(models_dir / name, dtype=torch.float32)
        for name in ("base", "ft_arith", "ft_reverse")
    }
    sds = {name: m.state_dict() for name, m in loaded.items()}
    ft = [sds["ft_arith"], sds["ft_reverse"]]
    merges = {
        "linear 0.5/0.5": merge_state_dicts(sds["base"], ft, [0.5, 0.5]),
        "task_arith 1/1": merge_state_dicts(sds["base"], ft, [1.0, 1.0]),
    }
    scratch = AutoModelForCausalLM.from_pretrained(models_dir / "base", dtype=torch.float32)

    table = {}
    for name, model in list(loaded.items()) + [(n, None) for n in merges]:
        if model is None:
            scratch.load_state_dict(merges[name])
            model = scratch
        t0 = time.time()
        table[name] = score_model(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
        table[name]["_seconds"] = time.time() - t0
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Score the demo models with lm-eval.")
    p.add_argument("--models", type=Path, default=None, help="demo models dir (default: build/reuse demo_models/)")
    p.add_argument("--seed", type=int, default=0, help="seed when the models must be built")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all 200)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--final", action="store_true", help="score the *_final splits instead of the search splits")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny matrices; 2 threads crawl when the 2 cores are shared
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    models_dir = args.models
    if models_dir is None:
        models_dir = ensure_demo_models(seed=args.seed)
    tasks = list(FINAL_TASKS if args.final else DEMO_TASKS)

    table = demo_table(Path(models_dir), tasks, args.limit, args.batch_size)
    width = max(len(t) for t in tasks) + 2
    print(f"{'model':<16}" + "".join(f"{t:>{width}}" for t in tasks) + f"{'sum':>7}{'secs':>7}")
    for name, scores in table.items():
        vals = [scores[t] for t in tasks]
        print(
            f"{name:<16}"
            + "".join(f"{v:>{width}.3f}" for v in vals)
            + f"{sum(vals):>7.3f}{scores['_seconds']:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
