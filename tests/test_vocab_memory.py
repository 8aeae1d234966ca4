"""Peak memory of a vocabulary merge whose embeddings are larger than --memory-budget.

Three llama models with a 32000 x 512 vocabulary (32 MB per bf16 embedding tensor, 192 MB
of embedding inputs in all): a base, a ChatML fine-tune (two added tokens), and one whose
tokenizer lists the words in another order. The merge runs in a subprocess; its peak RSS
(VmHWM, reset after planning) minus its RSS before the merge must stay under the budget.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

V, H = 32000, 512
BUDGET = 24 * 2**20


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _build(root: str) -> dict:
    from models import build_model, save_tokenizer

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(V - 4)]
    kw = dict(hidden=H, layers=1, intermediate=64, heads=4, kv_heads=2)
    g = torch.Generator().manual_seed(0)
    base = build_model("llama", vocab=V, seed=1, **kw)
    bsd = base.state_dict()
    paths = {}

    def save(name, vocab, tok_words, extra=(), rows=None):
        m = build_model("llama", vocab=vocab, seed=1, **kw)
        sd = m.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                src = bsd[k] if rows is None or not k.endswith(("embed_tokens.weight", "lm_head.weight")) \
                    else bsd[k][rows]
                v[: src.shape[0]].copy_(src)
                if name != "base":
                    v.add_((torch.randn(v.shape, generator=g) * 0.01).to(v.dtype))
        m.save_pretrained(os.path.join(root, name))
        save_tokenizer(os.path.join(root, name), tok_words, extra)
        paths[name] = os.path.join(root, name)

    save("base", V, words)
    save("chatml", V + 2, words, ["<|im_start|>", "<|im_end|>"])
    order = words[:4] + random.Random(1).sample(words[4:], V - 4)
    pos = {w: i for i, w in enumerate(words)}
    save("shuffled", V, order, rows=torch.tensor([pos[w] for w in order]))
    return paths


RECIPE = """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {chatml}
    parameters: {{weight: 0.3}}
  - model: {shuffled}
    parameters: {{weight: 0.3}}
dtype: bfloat16
tokenizer:
  source: union
"""


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


@pytest.mark.slow
def test_embedding_merge_stays_under_memory_budget(tmp_path):
    paths = _build(str(tmp_path / "models"))
    recipe = tmp_path / "r.yml"
    recipe.write_text(RECIPE.format(**paths))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, __file__, str(recipe), str(out), str(BUDGET)], capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    print(stats)
    embed_bytes = V * H * 2
    assert embed_bytes > BUDGET and stats["embed_in_bytes"] >= 6 * embed_bytes
    assert stats["chunks"] > 2
    assert stats["peak_rss_delta"] < BUDGET, stats

    # the streamed result is the one computed whole, in memory
    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    whole = tmp_path / "whole"
    run_merge(load_recipe(str(recipe)), str(whole), MergeOptions(quiet=True, memory_budget=2**34))
    name = "model-00001-of-00001.safetensors"
    assert _sha(out / name) == _sha(whole / name)


def _child(recipe_path: str, out: str, budget: int) -> None:
    import gc

    from ray_merge.engine import make_plan, run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    opts = MergeOptions(quiet=True, memory_budget=budget)
    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe, opts)
    gc.collect()
    before = _status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: measure the merge, not imports and planning
    run_merge(recipe, out, opts, plan=plan)
    after = _status()
    pt = plan.tensor("model.embed_tokens.weight")
    rows = pt.row_remap.rows_per_chunk(budget)
    print(json.dumps({
        "budget": budget, "baseline_rss": before["VmRSS"], "peak_rss": after["VmHWM"],
        "peak_rss_delta": after["VmHWM"] - before["VmRSS"], "rows_per_chunk": rows,
        "chunks": -(-pt.shape[0] // rows),
        "embed_in_bytes": sum(i.shape[0] * i.shape[1] * 2 for t in plan.tensors if t.row_remap for i in t.inputs),
    }))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
