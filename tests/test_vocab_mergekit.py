"""Agreement with mergekit (the side venv) on recipes whose models' vocabularies differ.

Same output vocabulary (tokenizer.json's model vocab, the added tokens and their ids),
same config vocab_size, and the same embedding rows token by token. mergekit orders the
regular tokens a union adds by Python hash order (its get_vocab() dicts), so those few
tokens may get other ids there: rows are compared by token, ids by set.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import load_dir, mergekit_venv, write_recipe
from test_vocab import _subst, vocab_models  # noqa: F401  (module fixture)

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

CASES = {
    # four tokenizers: added ChatML tokens, another word order, six extra words; bf16 as usual
    "union": ("""
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.4}
  - model: CHATML
    parameters: {weight: 0.3}
  - model: SHUFFLED
    parameters: {weight: 0.2}
  - model: BIG
    parameters: {weight: 0.1}
dtype: bfloat16
tokenizer:
  source: union
""", dict(rtol=1e-2, atol=1e-5)),
    "base": ("""
merge_method: task_arithmetic
base_model: BASE
models:
  - model: CHATML
    parameters: {weight: 0.7}
  - model: SHUFFLED
    parameters: {weight: 0.5}
dtype: float32
tokenizer_source: base
""", dict(rtol=1e-4, atol=1e-6)),
    "model_source": ("""
merge_method: linear
models:
  - model: SHUFFLED
    parameters: {weight: 0.5}
  - model: CHATML
    parameters: {weight: 0.5}
base_model: SHUFFLED
dtype: float32
tokenizer:
  source: CHATML
""", dict(rtol=1e-4, atol=1e-6)),
    # whole-tensor method, every kind of token override, padding
    # (multislerp, not ties: mergekit orders the union by string hash, so duplicate rows land at other
    # offsets and its top-k breaks magnitude ties differently from run to run)
    "overrides_multislerp": ("""
merge_method: multislerp
base_model: BASE
models:
  - model: CHATML
    parameters: {weight: 0.6}
  - model: BIG
    parameters: {weight: 0.4}
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 32
  tokens:
    <|im_start|>:
      source: CHATML
      force: false
    <|im_end|>:
      source: {kind: zero}
    w7:
      source: CHATML
      force: true
    x2:
      source: {kind: model_token, model: BASE, token: w9}
    <|new|>:
      source: {kind: model_token, model: CHATML, token_id: 3}
""", dict(rtol=1e-4, atol=1e-6)),
}


def _tokenizer(out):
    from transformers import AutoTokenizer

    with open(os.path.join(out, "tokenizer.json")) as f:
        data = json.load(f)
    return AutoTokenizer.from_pretrained(out).get_vocab(), data


def _close(a, b, rtol, atol, max_bad=1e-3):
    if a.numel() == 0:
        return b.numel() == 0
    bad = (a.float() - b.float()).abs() > atol + rtol * a.float().abs()
    return bad.float().mean().item() <= max_bad


@pytest.mark.parametrize("case", sorted(CASES))
def test_vocab_agrees_with_mergekit(tmp_path, vocab_models, case):  # noqa: F811
    text, tol = CASES[case]
    recipe = write_recipe(tmp_path / f"{case}.yml", text, **_subst(vocab_models))
    venv = mergekit_venv()
    mk_out, our_out = tmp_path / "mk", tmp_path / "ours"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([os.path.join(venv, "bin", "mergekit-yaml"), recipe, str(mk_out), "--random-seed", "0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]

    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    run_merge(load_recipe(recipe), str(our_out), MergeOptions(quiet=True, random_seed=0))

    # vocabulary
    mk_vocab, mk_json = _tokenizer(mk_out)
    our_vocab, our_json = _tokenizer(our_out)
    assert our_json["model"]["vocab"] == mk_json["model"]["vocab"]
    assert set(our_vocab) == set(mk_vocab)
    assert sorted(our_vocab.values()) == sorted(mk_vocab.values())
    base_tokens = set(mk_json["model"]["vocab"])
    mk_added = {a["content"]: a for a in mk_json["added_tokens"]}
    for a in our_json["added_tokens"]:
        assert {k: v for k, v in a.items() if k != "id"} == {k: v for k, v in mk_added[a["content"]].items()
                                                            if k != "id"}
    for t, i in mk_vocab.items():  # ids agree except the order of union-added regular tokens
        if t in base_tokens or mk_added.get(t, {}).get("special"):
            assert our_vocab[t] == i, t
    for key in ("vocab_size", "num_hidden_layers"):
        assert json.load(open(our_out / "config.json"))[key] == json.load(open(mk_out / "config.json"))[key]

    # tensors: vocabulary rows by token (padding rows as they are), the rest as they are
    mk, ours = load_dir(mk_out), load_dir(our_out)
    assert set(mk) == set(ours)
    n = len(mk_vocab)
    tokens = sorted(mk_vocab)
    for name in mk:
        a, b = mk[name], ours[name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if name in VOCAB_TENSORS:
            mk_rows = torch.tensor([mk_vocab[t] for t in tokens])
            our_rows = torch.tensor([our_vocab[t] for t in tokens])
            assert _close(a[mk_rows], b[our_rows], **tol), name
            assert _close(a[n:], b[n:], **tol), name + " padding rows"
        else:
            assert _close(a, b, **tol), name
