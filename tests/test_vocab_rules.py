"""Vocabulary and dtype rules of issue #10, each checked against its expectation and against mergekit (the side venv).

- 1-D vocabulary tensors (phi's ``lm_head.bias``) are remapped to the output tokenizer like the embedding rows.
- ``--unsafe-truncate-embeddings``: without tokenizer settings, vocabulary tensors keep the rows every model has.
- ``dtype`` unset with inputs of different precisions: every tensor is merged and written in their promoted dtype.
- A donor without tokenizer files: the output has none (a warning); a tokenizer setting needs the base's.
"""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess

import pytest
import torch
from conftest import load_dir, mergekit_venv, run_cli, write_recipe
from models import WORDS, build_model, perturb, save_model, save_tokenizer

CHATML = ["<|im_start|>", "<|im_end|>"]
SHUFFLED = WORDS[:4] + random.Random(7).sample(WORDS[4:], len(WORDS) - 4)
LLAMA = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def _phi(vocab: int):
    import transformers

    cfg = transformers.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=vocab, max_position_embeddings=128)
    return transformers.PhiForCausalLM(cfg)


def _phi_variant(base, path, tokens, seed, extra=()):
    """``base`` with vocabulary ``tokens + extra``: each token keeps the base's embedding row; its lm_head row and
    bias are the base's nudged by noise (random for the extra tokens); the rest of the model is the base's."""
    m = _phi(len(tokens) + len(extra))
    base_row = {t: i for i, t in enumerate(WORDS)}
    sd, bsd = m.state_dict(), base.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in sd.items():
            if k in VOCAB_TENSORS:
                v.normal_(0, 1, generator=g)
                for r, t in enumerate(tokens):
                    v[r] = bsd[k][base_row[t]]
                if k != "model.embed_tokens.weight":
                    v += 0.1 * torch.randn(v.shape, generator=g)
            else:
                v.copy_(bsd[k])
    m.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path, tokens, extra)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    torch.manual_seed(0)
    phi = _phi(len(WORDS))
    with torch.no_grad():
        phi.lm_head.bias.normal_(0, 1)
    paths = {"phi": save_model(phi, str(root / "phi"))}
    # another word order plus ChatML tokens: only a token-aligned bias gives the right logits
    paths["phi_chat"] = _phi_variant(phi, str(root / "phi_chat"), SHUFFLED, seed=1, extra=CHATML)
    # the same ids, two more rows: a fine-tune with a grown vocabulary
    big = _phi(len(WORDS) + 2)
    big.load_state_dict({k: torch.cat([v, v[:2]]) if k in VOCAB_TENSORS else v for k, v in phi.state_dict().items()})
    perturb(big, seed=2)
    paths["phi_big"] = save_model(big, str(root / "phi_big"), extra_tokens=CHATML)

    llama = build_model("llama", seed=3, **LLAMA)  # bfloat16
    paths["bf16"] = save_model(llama, str(root / "bf16"))
    for name, dtype, seed in (("fp16", torch.float16, 4), ("fp32", torch.float32, 5), ("notok", torch.bfloat16, 6)):
        m = build_model("llama", seed=3, **LLAMA)
        perturb(m, seed=seed)
        m = m.to(dtype)
        m.config.torch_dtype = dtype
        if name == "notok":  # weights and config only
            m.save_pretrained(str(root / name), safe_serialization=True)
            paths[name] = str(root / name)
        else:
            paths[name] = save_model(m, str(root / name))
    return paths


def _merge(tmp_path, text, name="out", **options):
    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    out = tmp_path / name
    plan = run_merge(load_recipe(write_recipe(tmp_path / f"{name}.yml", text)), str(out),
                     MergeOptions(quiet=True, **options))
    return out, plan


def _mergekit(tmp_path, text, name="mk", *flags):
    recipe = write_recipe(tmp_path / f"{name}.yml", text)
    out = tmp_path / name
    res = subprocess.run([os.path.join(mergekit_venv(), "bin", "mergekit-yaml"), recipe, str(out), *flags],
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    return out, res


def _vocab(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


# ---------------------------------------------------------------------------
# 1-D vocabulary tensors
# ---------------------------------------------------------------------------

PHI_UNION = """
merge_method: linear
base_model: {phi}
models:
  - model: {phi}
    parameters: {{weight: 0.3}}
  - model: {phi_chat}
    parameters: {{weight: 0.7}}
dtype: float32
tokenizer:
  source: union
"""


def test_lm_head_bias_is_remapped_logits_are_the_mix(tmp_path, models):
    """The merged logits of every output token are the weighted mix of the inputs' logits for that token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, plan = _merge(tmp_path, PHI_UNION.format(**models))
    assert {t.name for t in plan.tensors if t.row_remap is not None} == set(VOCAB_TENSORS)
    vocab = _vocab(out)
    assert len(vocab) == 258 and load_dir(out)["lm_head.bias"].shape == (258,)

    text = "w5 w17 w200 w3 w99"
    logits = {}
    for key, path in (("out", out), ("a", models["phi"]), ("b", models["phi_chat"])):
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[key] = model(torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0]
    va, vb = _vocab(models["phi"]), _vocab(models["phi_chat"])
    for t, i in vocab.items():
        if t in va:  # both models have it: 0.3 a + 0.7 b
            want = 0.3 * logits["a"][:, va[t]] + 0.7 * logits["b"][:, vb[t]]
        else:  # only the ChatML model: every model takes its row, so its logits
            want = logits["b"][:, vb[t]]
        torch.testing.assert_close(logits["out"][:, i], want, rtol=1e-4, atol=1e-5, msg=t)


def test_lm_head_bias_agrees_with_mergekit(tmp_path, models):
    text = PHI_UNION.format(**models)
    mk, res = _mergekit(tmp_path, text)
    assert res.returncode == 0, res.stderr[-2000:]
    ours, _ = _merge(tmp_path, text)
    mk_vocab, our_vocab = _vocab(mk), _vocab(ours)
    assert mk_vocab == our_vocab  # the union adds only special tokens here: same ids
    a, b = load_dir(mk), load_dir(ours)
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)



def test_bias_rows_stream_in_chunks(tmp_path, models):
    """A 1-D vocabulary tensor is read and merged a few rows at a time, with the same bytes as at once."""
    from ray_merge.engine import make_plan
    from ray_merge.execute.loaders import TensorLoader
    from ray_merge.execute.stream import iter_row_chunks
    from ray_merge.options import MergeOptions
    from ray_merge.planner.memory import rows_per_chunk
    from ray_merge.recipe.load import load_recipe

    text = PHI_UNION.format(**models) + "  pad_to_multiple_of: 64\n"
    plan = make_plan(load_recipe(write_recipe(tmp_path / "r.yml", text)), MergeOptions())
    pt = plan.tensor("lm_head.bias")
    assert pt.shape == (320,) and pt.row_remap.rest == ()
    small = list(iter_row_chunks(pt, TensorLoader(plan), rows_per_chunk(pt, pt.row_remap.per_row_bytes * 10),
                                 seed=None))
    assert len(small) > 20 and all(c.shape[0] <= 10 for _, c in small)
    whole = torch.cat([c for _, c in iter_row_chunks(pt, TensorLoader(plan), rows_per_chunk(pt, None), seed=None)])
    assert torch.equal(torch.cat([c for _, c in small]), whole)
    assert torch.equal(whole[258:], whole[258].expand(62))  # padding: the merge of each model's mean bias

def test_bias_lengths_differ_without_tokenizer(tmp_path, models):
    text = PHI_UNION.format(**models).replace("tokenizer:\n  source: union\n", "")
    recipe = write_recipe(tmp_path / "r.yml", text)
    res = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "r.yml" in line and "different shapes" in line and "--unsafe-truncate-embeddings" in line


# ---------------------------------------------------------------------------
# --unsafe-truncate-embeddings
# ---------------------------------------------------------------------------

TRUNCATE = """
merge_method: linear
base_model: {phi_big}
models:
  - model: {phi}
    parameters: {{weight: 0.4}}
  - model: {phi_big}
    parameters: {{weight: 0.6}}
dtype: float32
"""


def test_truncate_embeddings_agrees_with_mergekit(tmp_path, models, caplog):
    text = TRUNCATE.format(**models)
    mk, res = _mergekit(tmp_path, text, "mk", "--unsafe-truncate-embeddings")
    assert res.returncode == 0, res.stderr[-2000:]
    with caplog.at_level(logging.WARNING, logger="ray_merge"):
        ours, plan = _merge(tmp_path, text, unsafe_truncate_embeddings=True)
    assert sum("UNSAFE vocabulary truncation" in r.message for r in caplog.records) == 3
    a, b = load_dir(mk), load_dir(ours)
    assert set(a) == set(b)
    for name in a:  # the first 256 rows of both models, merged: bit for bit mergekit's
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert b["lm_head.bias"].shape == (256,) and b["model.embed_tokens.weight"].shape == (256, 32)
    # mergekit keeps the base's vocab_size (258), so its output does not load; ours says 256 rows
    assert json.load(open(mk / "config.json"))["vocab_size"] == 258
    assert json.load(open(ours / "config.json"))["vocab_size"] == 256
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(ours)).lm_head.bias.shape == (256,)


def test_truncate_flag_through_the_cli(tmp_path, models):
    recipe = write_recipe(tmp_path / "r.yml", TRUNCATE.format(**models))
    res = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert res.returncode == 2 and "--unsafe-truncate-embeddings" in res.stderr
    res = run_cli("run", recipe, tmp_path / "out", "--quiet", "--unsafe-truncate-embeddings")
    assert res.returncode == 0, res.stderr
    assert "UNSAFE vocabulary truncation for lm_head.bias" in res.stderr
    got, a, b = load_dir(tmp_path / "out"), load_dir(models["phi"]), load_dir(models["phi_big"])
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(got[name], 0.4 * a[name] + 0.6 * b[name][:256])


def test_truncate_flag_yields_to_tokenizer_settings(tmp_path, models, caplog):
    """With a tokenizer setting the vocabularies are aligned: the flag changes nothing (mergekit's precedence)."""
    text = TRUNCATE.format(**models) + "tokenizer_source: base\n"
    with caplog.at_level(logging.WARNING, logger="ray_merge"):
        flagged, _ = _merge(tmp_path, text, "flagged", unsafe_truncate_embeddings=True)
    assert any("has no effect" in r.message for r in caplog.records)
    plain, _ = _merge(tmp_path, text, "plain")
    a, b = load_dir(flagged), load_dir(plain)
    assert a["lm_head.bias"].shape == (258,)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncate_needs_equal_widths(tmp_path, models):
    from ray_merge.engine import make_plan
    from ray_merge.errors import UserError
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    text = TRUNCATE.format(**models).replace(models["phi_big"], models["bf16"])
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", text))
    with pytest.raises(UserError):
        make_plan(recipe, MergeOptions(unsafe_truncate_embeddings=True, allow_crimes=True))


# ---------------------------------------------------------------------------
# dtype unset, inputs of different precisions
# ---------------------------------------------------------------------------

MIXED = """
merge_method: {method}
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


@pytest.mark.parametrize("method, base, a, b, want", [
    ("linear", "bf16", "bf16", "fp16", torch.float32),
    ("task_arithmetic", "fp16", "bf16", "fp32", torch.float32),
    ("linear", "bf16", "bf16", "notok", torch.bfloat16),  # one precision: kept
])
def test_mixed_precision_promotes_like_mergekit(tmp_path, models, method, base, a, b, want):
    text = MIXED.format(method=method, base=models[base], a=models[a], b=models[b])
    ours, plan = _merge(tmp_path, text)
    got = load_dir(ours)
    assert {t.dtype for t in got.values()} == {want}
    assert {t.compute_dtype for t in plan.tensors} == {str(want).removeprefix("torch.")}
    # inputs cast to the promoted dtype, then merged: the expectation computed here
    ins = [load_dir(models[m]) for m in (base, a, b)]
    name = "model.layers.0.mlp.down_proj.weight"
    x = [t[name].to(want) for t in ins]
    expect = 0.5 * x[1] + 0.5 * x[2] if method == "linear" else x[0] + 0.5 * (x[1] - x[0]) + 0.5 * (x[2] - x[0])
    torch.testing.assert_close(got[name], expect, rtol=1e-2 if want == torch.bfloat16 else 1e-5, atol=1e-6)
    if b == "notok":
        return
    mk, res = _mergekit(tmp_path, text)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = load_dir(mk)
    assert set(theirs) == set(got)
    for name in theirs:
        assert theirs[name].dtype == got[name].dtype, name
        torch.testing.assert_close(theirs[name], got[name], rtol=1e-5, atol=1e-6, msg=name)
    # both keep the donor's config dtype (mergekit changes it only when the recipe sets one)
    key = lambda c: c.get("dtype") or c.get("torch_dtype")  # noqa: E731
    assert key(json.load(open(ours / "config.json"))) == key(json.load(open(mk / "config.json")))


def test_mixed_precision_vocabulary_tensors_and_out_dtype(tmp_path, models):
    """Remapped vocabulary tensors follow the same rule; out_dtype still decides what is written."""
    text = MIXED.format(method="linear", base=models["bf16"], a=models["bf16"], b=models["fp16"])
    out, plan = _merge(tmp_path, text + "tokenizer: {source: union}\n")
    pt = plan.tensor("model.embed_tokens.weight")
    assert pt.row_remap is not None and pt.row_remap.compute_dtype == "float32"
    assert {t.dtype for t in load_dir(out).values()} == {torch.float32}
    out, plan = _merge(tmp_path, text + "out_dtype: float16\n", "half")
    assert {(t.compute_dtype, t.out_dtype) for t in plan.tensors} == {("float32", "float16")}
    assert {t.dtype for t in load_dir(out).values()} == {torch.float16}


# ---------------------------------------------------------------------------
# a model without a tokenizer
# ---------------------------------------------------------------------------

NO_TOKENIZER = """
merge_method: linear
base_model: {base}
models:
  - model: {notok}
    parameters: {{weight: 0.5}}
  - model: {bf16}
    parameters: {{weight: 0.5}}
"""


def _tokenizer_files(path):
    return sorted(f for f in os.listdir(path) if f in TOKENIZER_FILES)


@pytest.mark.parametrize("extra", ["", "chat_template: chatml\n"])
def test_donor_without_tokenizer_writes_none(tmp_path, models, caplog, extra):
    """As mergekit: the merge succeeds, no tokenizer is written, and the log says so."""
    text = NO_TOKENIZER.format(base=models["notok"], **models) + extra
    with caplog.at_level(logging.WARNING, logger="ray_merge"):
        out, _ = _merge(tmp_path, text)
    assert _tokenizer_files(out) == [] and not os.path.exists(out / "chat_template.jinja")
    assert any("tokenizer" in r.message for r in caplog.records if r.levelno >= logging.WARNING)
    if extra:
        return
    mk, res = _mergekit(tmp_path, text)
    assert res.returncode == 0 and "Failed to copy tokenizer" in res.stderr
    assert _tokenizer_files(mk) == []


def test_tokenizer_setting_needs_the_base_tokenizer(tmp_path, models):
    """mergekit fails building the tokenizer; here a one-line error names the recipe key, exit 2."""
    text = NO_TOKENIZER.format(base=models["notok"], **models) + "tokenizer_source: union\n"
    recipe = write_recipe(tmp_path / "r.yml", text)
    res = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "r.yml" in line and "tokenizer_source" in line and "no tokenizer files" in line
    assert not (tmp_path / "out").exists()
    _, res = _mergekit(tmp_path, text)
    assert res.returncode != 0


def test_other_model_without_tokenizer_takes_the_base_vocabulary(tmp_path, models, caplog):
    """As mergekit: a non-base model whose tokenizer cannot be loaded is assumed to share the base's."""
    text = NO_TOKENIZER.format(base=models["bf16"], **models) + "tokenizer_source: union\n"
    with caplog.at_level(logging.WARNING, logger="ray_merge"):
        out, _ = _merge(tmp_path, text)
    assert any("assuming the base model's" in r.message for r in caplog.records)
    assert _vocab(out) == _vocab(models["bf16"])
    got, a, b = load_dir(out), load_dir(models["notok"]), load_dir(models["bf16"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], (0.5 * a[name].float() + 0.5 * b[name].float()).to(got[name].dtype))
