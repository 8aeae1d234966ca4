"""Merging models whose vocabularies differ: output tokenizer, remapped embedding rows, chunking.

Small llama models share every weight but the vocabulary: a base, a ChatML fine-tune (two
added special tokens, a grown vocabulary), a fine-tune whose tokenizer lists the same words
in another order (its embedding rows permuted to match), a fine-tune with six extra regular
words and two padding rows, and one whose tokenizer lists a token past its embedding.
The expected rows are computed here from the inputs and mergekit's documented rules.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from conftest import load_dir, run_cli, write_recipe
from models import WORDS, build_model, perturb, save_tokenizer

CHATML = ["<|im_start|>", "<|im_end|>"]
EXTRA_WORDS = [f"x{i}" for i in range(6)]
KW = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)


def _variant(base, path, words, extra=(), rows=None, seed=1, row_of=None):
    """Save a copy of ``base`` with vocabulary ``words + extra`` and ``rows`` embedding rows.

    ``row_of(token)`` gives the base row a token's embedding starts from (None: random).
    """
    n = rows or len(words) + len(extra)
    m = build_model("llama", vocab=n, seed=seed, **KW)
    sd, bsd = m.state_dict(), base.state_dict()
    tokens = list(words) + list(extra)
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape == bsd[k].shape and not (k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")):
                v.copy_(bsd[k])
            elif k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
                for r in range(min(n, len(tokens))):
                    src = row_of(tokens[r]) if row_of else None
                    if src is not None:
                        v[r].copy_(bsd[k][src])
    if seed:
        perturb(m, seed=seed)
    m.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path, words, extra)
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = build_model("llama", vocab=len(WORDS), seed=3, **KW)
    base_row = {w: i for i, w in enumerate(WORDS)}.get
    paths = {"base": _variant(base, str(root / "base"), WORDS, seed=0, row_of=base_row)}
    paths["chatml"] = _variant(base, str(root / "chatml"), WORDS, CHATML, seed=11, row_of=base_row)
    shuffled = WORDS[:4] + random.Random(5).sample(WORDS[4:], len(WORDS) - 4)
    paths["shuffled"] = _variant(base, str(root / "shuffled"), shuffled, seed=12, row_of=base_row)
    paths["big"] = _variant(base, str(root / "big"), WORDS + EXTRA_WORDS, rows=len(WORDS) + 8, seed=13,
                            row_of=base_row)
    # its tokenizer lists <|im_end|> at id 257, past its 257 embedding rows: not really its token
    paths["over"] = _variant(base, str(root / "over"), WORDS, CHATML, rows=len(WORDS) + 1, seed=14,
                             row_of=base_row)
    return paths


# ---------------------------------------------------------------------------
# expectations, computed from the inputs
# ---------------------------------------------------------------------------

def _vocab(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    n = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    return {t: i for t, i in tok.get_vocab().items() if i < n}


def _expected(out_dir, inputs, base=None, name="model.embed_tokens.weight", overrides=None, pad=None):
    """Expected merged rows for a normalized linear merge of ``inputs`` [(path, weight)].

    A model lacking a token (or any model, for a forced override) uses the default row:
    the override's, else the only owner's, else the base's, else the mean of the owners'.
    """
    from transformers import AutoTokenizer

    overrides = overrides or {}
    out_vocab = AutoTokenizer.from_pretrained(out_dir).get_vocab()
    tensors = [load_dir(p)[name].float() for p, _ in inputs]
    vocabs = [_vocab(p) for p, _ in inputs]
    paths = [p for p, _ in inputs]
    width = tensors[0].shape[1]
    n = len(out_vocab)
    rows_out = n if pad is None else -(-n // pad) * pad
    per_model = [torch.zeros(rows_out, width) for _ in inputs]
    for t, oid in out_vocab.items():
        owners = [i for i, v in enumerate(vocabs) if t in v]
        ov = overrides.get(t)
        if ov is not None and ov.get("kind") == "zero":
            default = torch.zeros(width)
        elif ov is not None and "model" in ov:
            j = paths.index(ov["model"])
            if "token_id" in ov:
                default = tensors[j][ov["token_id"]]
            elif "token" in ov:
                default = tensors[j][vocabs[j][ov["token"]]]
            else:
                default = tensors[j][vocabs[j][t]]
        elif len(owners) == 1:
            default = tensors[owners[0]][vocabs[owners[0]][t]]
        elif not owners:
            default = torch.zeros(width)
        elif base is not None and base in paths and paths.index(base) in owners:
            b = paths.index(base)
            default = tensors[b][vocabs[b][t]]
        else:
            default = sum(tensors[i][vocabs[i][t]] for i in owners) / len(owners)
        force = bool(ov and ov.get("force"))
        for i in range(len(inputs)):
            per_model[i][oid] = default if (force or t not in vocabs[i]) else tensors[i][vocabs[i][t]]
    if rows_out > n:
        for pm in per_model:
            pm[n:] = pm[:n].mean(0)
    total = sum(w for _, w in inputs)
    return sum(w * pm for (_, w), pm in zip(inputs, per_model)) / total


def _merge(tmp_path, text, name="out", **kw):
    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    path = write_recipe(tmp_path / f"{name}.yml", text, **kw)
    out = tmp_path / name
    plan = run_merge(load_recipe(path), str(out), MergeOptions(quiet=True))
    return out, plan


LINEAR_UNION = """
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
dtype: float32
tokenizer:
  source: union
"""


def _subst(m):
    return {"BASE": m["base"], "CHATML": m["chatml"], "SHUFFLED": m["shuffled"], "BIG": m["big"], "OVER": m["over"]}


def test_union_rows_ids_and_config(tmp_path, vocab_models):
    m = vocab_models
    out, plan = _merge(tmp_path, LINEAR_UNION, **_subst(m))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    # base ids kept; the new tokens follow in model order (base, chatml, shuffled, big), then id order
    assert all(vocab[w] == i for i, w in enumerate(WORDS))
    assert [vocab[t] for t in EXTRA_WORDS + CHATML] == list(range(256, 264))
    assert len(vocab) == 264
    cfg = json.load(open(out / "config.json"))
    assert cfg["vocab_size"] == 264
    # the added tokens tokenize to the ids their rows were written for
    ids = tok("w5 <|im_start|> x3 <|im_end|>", add_special_tokens=False).input_ids
    assert ids == [vocab["w5"], vocab["<|im_start|>"], vocab["x3"], vocab["<|im_end|>"]]
    got = load_dir(out)
    inputs = [(m["base"], 0.4), (m["chatml"], 0.3), (m["shuffled"], 0.2), (m["big"], 0.1)]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (264, 32)
        want = _expected(str(out), inputs, base=m["base"], name=name)
        torch.testing.assert_close(got[name].float(), want, rtol=1e-5, atol=1e-6)
    # a token only chatml has: every model sees chatml's row, so the merge is chatml's row
    chat = load_dir(m["chatml"])["model.embed_tokens.weight"]
    torch.testing.assert_close(got["model.embed_tokens.weight"][vocab["<|im_start|>"]], chat[256].float())
    # the shuffled model's rows were aligned by token, not by id
    assert not torch.equal(load_dir(m["shuffled"])["model.embed_tokens.weight"][10].float(),
                           got["model.embed_tokens.weight"][10])
    # the merged model runs with the new vocabulary
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([ids])).logits.shape == (1, 4, 264)


def test_base_and_model_sources(tmp_path, vocab_models):
    m = vocab_models
    inputs = [(m["base"], 0.5), (m["chatml"], 0.25), (m["shuffled"], 0.25)]
    text = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: CHATML
    parameters: {weight: 0.25}
  - model: SHUFFLED
    parameters: {weight: 0.25}
dtype: float32
tokenizer_source: SOURCE
"""
    for source, n in (("base", 256), (m["shuffled"], 256), (m["chatml"], 258)):
        out, _ = _merge(tmp_path, text.replace("SOURCE", source), name=f"src{n}_{len(source)}", **_subst(m))
        got = load_dir(out)["model.embed_tokens.weight"]
        assert got.shape == (n, 32)
        assert json.load(open(out / "config.json"))["vocab_size"] == n
        want_vocab = _vocab(source if source != "base" else m["base"])
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out).get_vocab() == want_vocab
        torch.testing.assert_close(got.float(), _expected(str(out), inputs, base=m["base"]), rtol=1e-5, atol=1e-6)


def test_token_overrides_and_padding(tmp_path, vocab_models):
    m = vocab_models
    text = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: CHATML
    parameters: {weight: 0.5}
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    <|im_start|>:
      source: BASE_TOK
    <|im_end|>:
      source: {kind: zero}
    w7:
      source: CHATML
      force: true
    w8:
      source: {kind: model_token, model: BASE, token: w9}
      force: true
    <|new|>:
      source: {kind: model_token, model: CHATML, token_id: 3}
"""
    # <|im_start|> from the base is an error (the base lacks it): checked below; here from chatml
    out, plan = _merge(tmp_path, text.replace("BASE_TOK", "CHATML"), **_subst(m))
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert vocab["<|new|>"] == 258 and len(vocab) == 259
    got = load_dir(out)["model.embed_tokens.weight"]
    assert got.shape == (272, 32)
    assert json.load(open(out / "config.json"))["vocab_size"] == 272
    overrides = {
        "<|im_start|>": {"model": m["chatml"]},
        "<|im_end|>": {"kind": "zero"},
        "w7": {"model": m["chatml"], "force": True},
        "w8": {"model": m["base"], "token": "w9", "force": True},
        "<|new|>": {"model": m["chatml"], "token_id": 3},
    }
    want = _expected(str(out), [(m["base"], 0.5), (m["chatml"], 0.5)], base=m["base"], overrides=overrides, pad=16)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-6)
    chat = load_dir(m["chatml"])["model.embed_tokens.weight"].float()
    base = load_dir(m["base"])["model.embed_tokens.weight"].float()
    w = {t: vocab[t] for t in ("w7", "w8", "w9")}
    torch.testing.assert_close(got[w["w7"]].float(), chat[w["w7"]])  # forced: both models use chatml's row
    torch.testing.assert_close(got[w["w8"]].float(), base[w["w9"]])
    torch.testing.assert_close(got[257].float(), 0.5 * chat[257])  # zero for the base, own row for chatml
    assert torch.equal(got[259], got[271])  # padding rows: the merge of each model's mean row


def test_remap_chunked_identical_to_whole(tmp_path, vocab_models):
    """A tiny memory budget streams the embeddings in many row chunks, with identical bytes."""
    from ray_merge.engine import make_plan
    from ray_merge.execute.loaders import ResidentLoader, TensorLoader
    from ray_merge.execute.shards import write_shards
    from ray_merge.execute.stream import iter_row_chunks, merge_in_memory
    from ray_merge.options import MergeOptions
    from ray_merge.planner.memory import rows_per_chunk

    m = vocab_models
    text = LINEAR_UNION.replace("dtype: float32", "dtype: bfloat16") + "  pad_to_multiple_of: 64\n"
    path = write_recipe(tmp_path / "r.yml", text, **_subst(m))
    from ray_merge.recipe.load import load_recipe

    recipe = load_recipe(path)
    plan = make_plan(recipe, MergeOptions())
    pt = plan.tensor("model.embed_tokens.weight")
    assert pt.row_remap is not None and pt.row_remap.chunked and pt.shape == (320, 32)
    per_row = pt.row_remap.per_row_bytes
    chunks = list(iter_row_chunks(pt, TensorLoader(plan), rows_per_chunk(pt, per_row * 10), seed=None))
    # 264 token rows then 56 padding rows, at most 10 rows a chunk, in order
    assert len(chunks) == 27 + 6 and all(c.shape[0] <= 10 for _, c in chunks)
    assert [a for a, _ in chunks] == list(range(0, 264, 10)) + list(range(264, 320, 10))
    whole = torch.cat([c for _, c in iter_row_chunks(pt, TensorLoader(plan), rows_per_chunk(pt, None), seed=None)])
    assert torch.equal(torch.cat([c for _, c in chunks]), whole)
    # end to end through the shard writer, and in memory
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ra = write_shards(plan, plan.shards, str(tmp_path / "a"), memory_budget=per_row * 7)
    rb = write_shards(plan, plan.shards, str(tmp_path / "b"), memory_budget=2**30)
    assert [r.checksum for r in ra] == [r.checksum for r in rb]
    mem = merge_in_memory(plan)
    assert torch.equal(mem["model.embed_tokens.weight"], whole)
    resident = merge_in_memory(plan, ResidentLoader(plan))  # rows sliced from the kept inputs
    assert torch.equal(resident["model.embed_tokens.weight"], whole)


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_whole_tensor_methods_see_aligned_inputs(tmp_path, vocab_models, method):
    """Methods that need whole tensors get the remapped per-model tensors (built chunk by chunk)."""
    from ray_merge.engine import make_plan
    from ray_merge.execute.compute import compute_tensor
    from ray_merge.execute.loaders import TensorLoader
    from ray_merge.execute.rows import tensor_rows
    from ray_merge.execute.stream import merge_in_memory
    from ray_merge.methods import get_method
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    get_method(method)
    m = vocab_models
    params = "parameters: {density: 0.5, weight: 0.5}" if method == "ties" else "parameters: {t: 0.3}"
    models = "  - model: CHATML\n    " + (params if method == "ties" else "")
    text = f"""
merge_method: {method}
base_model: BASE
models:
  - model: BASE
{models}
{params if method == 'slerp' else ''}
dtype: float32
tokenizer:
  source: union
"""
    path = write_recipe(tmp_path / f"{method}.yml", text, **_subst(m))
    plan = make_plan(load_recipe(path), MergeOptions())
    pt = plan.tensor("model.embed_tokens.weight")
    assert pt.shape == (258, 32) and not pt.row_remap.chunked
    # the per-model inputs the method sees: each model's rows, defaults where it lacks a token
    per_model = tensor_rows(pt, TensorLoader(plan)).whole(pt.row_remap.per_row_bytes * 100)
    order = [plan.models[i.model].path for i in pt.inputs]
    base = load_dir(m["base"])["model.embed_tokens.weight"].float()
    chat = load_dir(m["chatml"])["model.embed_tokens.weight"].float()
    for path_i, t in zip(order, per_model):
        assert t.shape == (258, 32)
        if path_i == m["base"]:
            torch.testing.assert_close(t[:256], base)
            torch.testing.assert_close(t[256:], chat[256:])  # only chatml has them
        else:
            torch.testing.assert_close(t, chat)
    want = compute_tensor(pt, per_model, None)
    assert torch.equal(merge_in_memory(plan)["model.embed_tokens.weight"], want)


@pytest.mark.parametrize("kind, name", [("qwen2", "model.embed_tokens.weight"), ("gpt2", "transformer.wte.weight")])
def test_tied_embeddings_union(tmp_path, kind, name):
    """Tied input/output embeddings (qwen2, gpt2's wte): one vocabulary tensor, remapped."""
    from models import save_model

    kw = dict(KW) if kind == "qwen2" else dict(hidden=32, layers=1, heads=2)
    base = build_model(kind, vocab=256, seed=2, **kw)
    a = save_model(base, str(tmp_path / "a"))
    big = build_model(kind, vocab=258, seed=2, **kw)
    sd = big.state_dict()
    with torch.no_grad():
        for k, v in base.state_dict().items():
            sd[k][: v.shape[0]].copy_(v) if v.shape != sd[k].shape else sd[k].copy_(v)
    perturb(big, seed=4)
    b = save_model(big, str(tmp_path / "b"), extra_tokens=CHATML)
    text = f"""
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
tokenizer_source: union
"""
    out, plan = _merge(tmp_path, text)
    got = load_dir(out)
    assert "lm_head.weight" not in got and got[name].shape == (258, 32)
    assert [t.name for t in plan.tensors if t.row_remap is not None] == [name]
    want = _expected(str(out), [(a, 0.5), (b, 0.5)], base=None, name=name)
    torch.testing.assert_close(got[name].float(), want, rtol=1e-5, atol=1e-6)
    if kind == "gpt2":  # position embeddings are not on the vocabulary axis
        assert got["transformer.wpe.weight"].shape == load_dir(a)["transformer.wpe.weight"].shape


def test_token_past_embedding_is_ignored(tmp_path, vocab_models):
    """A tokenizer entry past the model's vocab_size has no row: treated as absent (mergekit strips it)."""
    m = vocab_models
    text = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: OVER
    parameters: {weight: 0.5}
dtype: float32
tokenizer:
  source: union
"""
    out, _ = _merge(tmp_path, text, **_subst(m))
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert "<|im_start|>" in vocab and "<|im_end|>" not in vocab and len(vocab) == 257
    got = load_dir(out)["model.embed_tokens.weight"].float()
    want = _expected(str(out), [(m["base"], 0.5), (m["over"], 0.5)], base=m["base"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_differing_vocab_without_tokenizer_is_a_user_error(tmp_path, vocab_models):
    m = vocab_models
    text = """
merge_method: linear
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: CHATML
    parameters: {weight: 0.5}
"""
    from ray_merge.engine import make_plan
    from ray_merge.errors import UserError
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    recipe = write_recipe(tmp_path / "r.yml", text, **_subst(m))
    with pytest.raises(UserError, match="different shapes.*tokenizer: {source: union}"):
        make_plan(load_recipe(recipe), MergeOptions())


ERR_RECIPE = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: CHATML
    parameters: {weight: 0.5}
"""
ERROR_CASES = [
    ("tokenizer:\n  tokens:\n    <|im_start|>:\n      source: /nowhere/model\n", "not one of the recipe's models"),
    ("tokenizer:\n  tokens:\n    <|im_start|>:\n      source: {kind: model_token, model: CHATML, token: nope}\n",
     "'nope' is not in the vocabulary"),
    ("tokenizer:\n  tokens:\n    <|im_start|>:\n      source: BASE\n", "is not in the vocabulary of model"),
    ("tokenizer:\n  tokens:\n    w1:\n      source: {kind: model_token, model: BASE, token_id: 999}\n",
     "out of range"),
    ("tokenizer:\n  tokens:\n    w1:\n      source: {kind: other}\n", "must be 'model_token' or 'zero'"),
    ("tokenizer:\n  tokens:\n    w1:\n      source: {kind: model_token, model: BASE, token: w1, token_id: 1}\n",
     "exactly one of"),
    ("tokenizer:\n  pad_to_multiple_of: 0\n", "positive integer"),
    ("tokenizer:\n  sauce: union\n", "unknown key"),
    ("tokenizer: {source: union}\ntokenizer_source: base\n", "not both"),
    ("chat_template: '{% for m in messages %}{{ m.content }'\n", "does not render"),
    ("chat_template: \"{{ raise_exception('nope') }}\"\n", "does not render"),
    ("chat_template: chatml2\n", "unknown chat template"),
]


@pytest.mark.parametrize("snippet, message", ERROR_CASES)
def test_recipe_errors_before_any_tensor_is_read(tmp_path, vocab_models, snippet, message, monkeypatch):
    from ray_merge.engine import run_merge
    from ray_merge.errors import UserError
    from ray_merge.execute.loaders import TensorLoader
    from ray_merge.io.models import WeightReader
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read")

    for cls, attr in ((WeightReader, "read"), (WeightReader, "read_rows"), (TensorLoader, "load_rows")):
        monkeypatch.setattr(cls, attr, no_reads)
    recipe = write_recipe(tmp_path / "r.yml", ERR_RECIPE + snippet, **_subst(vocab_models))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        run_merge(load_recipe(recipe), str(out), MergeOptions(quiet=True))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not os.path.exists(str(out) + ".ray-merge-partial")


@pytest.mark.parametrize("snippet, message", [ERROR_CASES[2], ERROR_CASES[9]])
def test_cli_errors_exit_2_one_line(tmp_path, vocab_models, snippet, message):
    recipe = write_recipe(tmp_path / "r.yml", ERR_RECIPE + snippet, **_subst(vocab_models))
    out = tmp_path / "out"
    res = run_cli("run", recipe, out, "--quiet")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not out.exists() and not os.path.exists(str(out) + ".ray-merge-partial")
