"""The honest evolution benchmark (evolve/bench_models.py, evolve/bench.py).

The fast tests check the construction: the held-out files are what the generator writes, fine-tuning never
sees a held-out example, pretraining never sees a benchmark task.  The slow test scores the models cached in
$RAY_MERGE_BENCH_MODELS or bench_models/ (.ci/run builds them; built here if missing, ~10 CPU minutes) and
checks the qualitative claims of README "An honest benchmark" on a subset of the search split.
"""
from __future__ import annotations

import json
import random

import pytest

from evolve import bench_models as bm


def test_task_data_files_match_the_generator():
    for task, splits in bm.heldout_examples().items():
        for split, examples in splits.items():
            path = bm.TASK_DATA_DIR / f"{task}_{split}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert rows == examples, f"{path} is stale: run python -m evolve.bench_models --write-task-data"
    assert all(len(s["final"]) >= 300 for s in bm.heldout_examples().values())


def test_splits_are_disjoint_and_never_trained_on():
    held = bm.heldout_examples()
    for task in bm.TASKS:
        prompts = [ex["prompt"] for exs in held[task].values() for ex in exs]
        assert len(set(prompts)) == len(prompts)
        sample = bm.FinetuneSampler(task, random.Random(1))
        for _ in range(3000):
            ex = sample()
            assert ex["prompt"].startswith(task + " ") and ex["prompt"] not in set(prompts)


def test_pretraining_never_shows_a_benchmark_task():
    rng = random.Random(0)
    ops = set()
    for _ in range(5000):
        ex = bm.pretrain_example(rng)
        op = ex["prompt"].split(" ", 1)[0]
        ops.add(op)
        assert op not in bm.TASKS
        ids, labels = bm.encode(ex, prompt_loss=True)  # every character is in the vocabulary
        assert len(ids) <= bm.MAX_LEN and labels == ids
    assert ops == set(bm.PRETRAIN_OPS)


def test_tokenizer_is_character_level_with_bos():
    tok = bm.build_tokenizer()
    ids = tok("add 12 34 = ")["input_ids"]
    assert ids[0] == tok.bos_token_id == bm.BOS_ID and len(ids) == 1 + len("add 12 34 = ")
    assert ids == bm.encode({"prompt": "add 12 34 = ", "answer": ""}, True)[0][:-1]
    assert len(tok) == bm.build_config(bm.ModelShape()).vocab_size
    assert bm.build_config(bm.ModelShape()).head_dim == 64  # vLLM CPU needs >= 32


@pytest.fixture(scope="module")
def scorer():
    import torch

    from evolve.bench import Scorer

    models = bm.ensure_bench_models(seed=0, log=lambda *_: None)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only help when the cores are idle
    yield Scorer(models, seed=0)
    torch.set_num_threads(prev)


@pytest.mark.slow
def test_each_finetune_learns_its_own_task_only(scorer):
    """The benchmark's premise: two plain fine-tunes, each good at its own task, poor at the other's."""
    from evolve.bench import SEARCH_TASKS

    s = {name: scorer.score_input(name, tasks=SEARCH_TASKS, limit=100) for name in bm.MODEL_NAMES}
    assert s["ft_add"]["bench_add"] >= s["base"]["bench_add"] + 0.5, s
    assert s["ft_rev"]["bench_rev"] >= s["base"]["bench_rev"] + 0.5, s
    assert s["ft_add"]["bench_rev"] <= 0.1 and s["ft_rev"]["bench_add"] <= 0.1, s


@pytest.mark.slow
def test_plain_merges_lose_both_skills(scorer):
    """README "An honest benchmark": with fine-tunes that had to learn their task (large task vectors), the
    linear average and task arithmetic keep neither skill: each scores under half the better input."""
    from evolve.bench import SEARCH_TASKS, hand_written

    inputs = [sum(scorer.score_input(n, tasks=SEARCH_TASKS, limit=100).values()) for n in bm.FINETUNES]
    recipes = dict(hand_written(scorer.models))
    for name in ("linear (average)", "task_arithmetic w1"):
        merged = sum(scorer.score(recipes[name], tasks=SEARCH_TASKS, limit=100).values())
        assert merged <= 0.5 * max(inputs), (name, merged, inputs)


def test_search_config_and_tasks_resolve():
    from evolve.bench import CONFIG, FINAL_TASKS, SEARCH_TASKS, TASK_DIR
    from evolve.config import load_config
    from evolve.demo_eval import task_manager

    cfg = load_config(str(CONFIG), ["genome.base_model=/m/base", "genome.models=[/m/ft_add,/m/ft_rev]"])
    assert [t.name for t in cfg.tasks] == list(SEARCH_TASKS)
    assert cfg.evaluation.include_paths == [str(TASK_DIR)]
    assert set(SEARCH_TASKS + FINAL_TASKS) <= set(task_manager(str(TASK_DIR)).all_tasks)
