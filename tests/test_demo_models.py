"""The CPU demo models for the evolutionary merge search.

The slow test builds the demo models (a few CPU minutes) into
$RAY_MERGE_DEMO_MODELS, or demo_models/ at the repo root (gitignored), unless a
complete build of the same recipe is already there -- the same cache the
evolve tests use -- then scores them with lm-eval on the held-out demo tasks.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from evolve import demo_models as mdm


def test_task_data_files_match_the_generator():
    """The committed JSONL files are exactly what the script generates."""
    held = mdm.heldout_examples()
    for task, splits in held.items():
        for split, examples in splits.items():
            path = mdm.TASK_DATA_DIR / f"{task}_{split}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert rows == examples, f"{path} is stale: run make_demo_models.py --write-task-data"


def test_training_never_sees_heldout_examples():
    held = mdm.heldout_examples()
    prompts = {ex["prompt"] for splits in held.values() for exs in splits.values() for ex in exs}
    assert len(prompts) == sum(len(exs) for splits in held.values() for exs in splits.values())
    sampler = mdm.TaskSampler(random.Random(0))
    for _ in range(3000):
        assert sampler.arith()["prompt"] not in prompts
        assert sampler.reverse()["prompt"] not in prompts


def test_tokenizer_is_character_level_with_bos():
    tok = mdm.build_tokenizer()
    ids = tok("rev abc = ")["input_ids"]
    assert ids[0] == tok.bos_token_id == mdm.BOS_ID
    assert len(ids) == 1 + len("rev abc = ")
    assert tok.decode(ids, skip_special_tokens=True) == "rev abc = "
    assert tok.eos_token_id == mdm.EOS_ID and tok.pad_token_id == mdm.PAD_ID
    assert len(tok) == mdm.build_config(mdm.ModelShape()).vocab_size
    assert mdm.build_config(mdm.ModelShape()).head_dim == 64  # vLLM CPU needs >= 32


@pytest.fixture(scope="module")
def demo_models() -> Path:
    out = Path(os.environ.get("RAY_MERGE_DEMO_MODELS") or mdm.DEFAULT_OUT)
    return mdm.ensure_demo_models(out, seed=0, log=lambda *_: None)


@pytest.mark.slow
def test_finetunes_beat_base_on_their_own_skill(demo_models):
    import lm_eval  # noqa: F401
    import torch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only help when the cores are idle
    try:
        _check_scores(demo_models)
    finally:
        torch.set_num_threads(prev_threads)


def _check_scores(demo_models: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolve.demo_eval import merge_state_dicts, score_model

    tasks = ["demo_arith", "demo_reverse"]
    tok = AutoTokenizer.from_pretrained(demo_models / "base")
    scores, sds = {}, {}
    for name in mdm.MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(demo_models / name, dtype=torch.float32)
        scores[name] = score_model(model, tok, tasks, limit=50)
        sds[name] = model.state_dict()

    base, arith, rev = scores["base"], scores["ft_arith"], scores["ft_reverse"]
    assert arith["demo_arith"] >= base["demo_arith"] + 0.3, scores
    assert rev["demo_reverse"] >= base["demo_reverse"] + 0.3, scores
    # ... and each is poor at the other skill.
    assert arith["demo_reverse"] <= 0.2, scores
    assert rev["demo_arith"] <= 0.2, scores

    # A merge has something to win: task arithmetic of the two fine-tunes
    # beats each of them on the summed score.
    model.load_state_dict(merge_state_dicts(sds["base"], [sds["ft_arith"], sds["ft_reverse"]], [1.0, 1.0]))
    merged = score_model(model, tok, tasks, limit=50)
    assert sum(merged.values()) > max(sum(arith.values()), sum(rev.values())) + 0.1, (merged, scores)
