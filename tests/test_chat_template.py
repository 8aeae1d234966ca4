"""chat_template: built-ins, literal templates, auto, and where transformers reads them."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import write_recipe

from ray_merge.chat_template import (
    BUILTIN_TEMPLATES,
    SAMPLE_CONVERSATION,
    render_sample,
)

CONV = [{"role": "system", "content": "Be brief."}] + SAMPLE_CONVERSATION


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three small llama models (base + 2 fine-tunes); the second has ChatML tokens."""
    from models import build_model, perturb, save_model

    root = tmp_path_factory.mktemp("chat")
    kw = dict(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1)
    base = build_model("llama", seed=1, **kw)
    paths = {"base": save_model(base, str(root / "base"))}
    for i, extra in ((0, ()), (1, ("<|im_start|>", "<|im_end|>"))):
        m = build_model("llama", vocab=256 + len(extra), seed=1, **kw)
        sd = m.state_dict()
        for k, v in base.state_dict().items():
            if v.shape == sd[k].shape:
                sd[k].copy_(v)
            else:
                sd[k][: v.shape[0]].copy_(v)
        perturb(m, seed=20 + i)
        paths[f"ft{i}"] = save_model(m, str(root / f"ft{i}"), extra_tokens=extra)
    return paths


def _merge(tmp_path, text, *, name="out", copy_tokenizer=True, **subst):
    from ray_merge.engine import run_merge
    from ray_merge.options import MergeOptions
    from ray_merge.recipe.load import load_recipe

    recipe = write_recipe(tmp_path / f"{name}.yml", text, **subst)
    out = tmp_path / name
    run_merge(load_recipe(recipe), str(out), MergeOptions(quiet=True, copy_tokenizer=copy_tokenizer))
    return out


RECIPE = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.5}
  - model: FT0
    parameters: {weight: 0.5}
"""


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_in_transformers(tiny, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.chat_template = BUILTIN_TEMPLATES[name]
    text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in text and "What can you do?" in text
    # transformers' renderer and our sandboxed check agree
    assert text == render_sample(BUILTIN_TEMPLATES[name], CONV)


def test_builtin_template_is_written_where_transformers_reads_it(tmp_path, tiny):
    """Without a tokenizer block the donor's tokenizer is copied and the template added."""
    from transformers import AutoTokenizer

    # the donor already has a template in tokenizer_config.json: ours must win
    cfg_path = os.path.join(tiny["base"], "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    donor = tmp_path / "donor"
    shutil.copytree(tiny["base"], donor)
    json.dump({**cfg, "chat_template": "{{ 'OLD' }}"}, open(donor / "tokenizer_config.json", "w"))
    out = _merge(tmp_path, RECIPE + "chat_template: llama3\n", BASE=donor, FT0=tiny["ft0"])
    assert (out / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["llama3"]
    assert "chat_template" not in json.load(open(out / "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_literal_template_with_union_tokenizer(tmp_path, tiny):
    """A literal template and a union vocabulary: the template's special tokens get their ids."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    text = RECIPE.replace("FT0", "FT1") + "tokenizer:\n  source: union\nchat_template: " + json.dumps(template) + "\n"
    out = _merge(tmp_path, text, BASE=tiny["base"], FT1=tiny["ft1"])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == template
    vocab = tok.get_vocab()
    ids = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)
    start, end = vocab["<|im_start|>"], vocab["<|im_end|>"]
    assert (start, end) == (256, 257)
    assert ids[0] == start and end in ids and ids.count(start) == 2
    assert vocab["w1"] in ids and vocab["w2"] in ids


def test_auto_picks_the_most_common_template(tmp_path, tiny):
    from ray_merge.chat_template import resolve_chat_template

    dirs = {}
    for k, tmpl in (("base", BUILTIN_TEMPLATES["alpaca"]), ("ft0", BUILTIN_TEMPLATES["chatml"]),
                    ("ft1", BUILTIN_TEMPLATES["chatml"])):
        d = tmp_path / k
        shutil.copytree(tiny[k], d)
        if k == "ft1":  # the legacy place: tokenizer_config.json
            cfg = json.load(open(d / "tokenizer_config.json"))
            json.dump({**cfg, "chat_template": tmpl}, open(d / "tokenizer_config.json", "w"))
        else:
            (d / "chat_template.jinja").write_text(tmpl)
        dirs[k] = str(d)
    assert resolve_chat_template("auto", list(dirs.values())) == BUILTIN_TEMPLATES["chatml"]
    assert resolve_chat_template("auto", [dirs["base"], str(tmp_path)]) == BUILTIN_TEMPLATES["alpaca"]
    assert resolve_chat_template("auto", [str(tmp_path)]) is None
    text = """
merge_method: linear
base_model: BASE
models:
  - model: BASE
    parameters: {weight: 0.4}
  - model: FT0
    parameters: {weight: 0.3}
  - model: FT1
    parameters: {weight: 0.3}
tokenizer_source: union
chat_template: auto
"""
    out = _merge(tmp_path, text, BASE=dirs["base"], FT0=dirs["ft0"], FT1=dirs["ft1"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"]
    assert tok.apply_chat_template(CONV[:2], tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_no_copy_tokenizer_writes_no_template(tmp_path, tiny):
    out = _merge(tmp_path, RECIPE + "chat_template: chatml\n", copy_tokenizer=False, BASE=tiny["base"],
                 FT0=tiny["ft0"])
    assert not (out / "chat_template.jinja").exists() and not (out / "tokenizer.json").exists()


def test_check_chat_template_values():
    from ray_merge.chat_template import check_chat_template

    def err(key, msg):
        return ValueError(f"{key}: {msg}")

    for ok in ("auto", "chatml", "{{ messages[0]['content'] }}", None):
        check_chat_template(ok, err)
    for bad, msg in ((3, "must be"), ("", "must be"), ("vicuna", "unknown chat template"),
                     ("{% if %}", "does not render"), ("{{ ''.__class__.__mro__ }}", "does not render"),
                     ("{{ '' }}", "empty")):
        with pytest.raises(ValueError, match=msg):
            check_chat_template(bad, err)
