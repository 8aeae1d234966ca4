"""The models and recipe of `ray-merge demo`: a small Llama base and fine-tunes, built locally.

Nothing is downloaded: weights are random (seeded), the "fine-tunes" are the base nudged by
seeded noise, and the tokenizer is a word-level one built with `tokenizers`. The offline
examples and the tests build their models with these functions too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional, Sequence

import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(252)]

# The demo's recipe: DEMO/ stands for the directory the demo builds its models in.
DEMO_RECIPE = """\
# The demo merge: TIES of two fine-tunes onto their base. `ray-merge demo` builds the
# three small models under DEMO/ and runs this recipe; any mergekit recipe works the same way.
merge_method: ties
base_model: DEMO/llama_base
models:
  - model: DEMO/llama_ft0
    parameters: {weight: 0.6, density: 0.5}
  - model: DEMO/llama_ft1
    parameters: {weight: 0.4, density: 0.5}
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
"""
DEMO_SHAPE = dict(hidden=128, layers=4, intermediate=344, heads=2, kv_heads=1, vocab=256)


def save_tokenizer(out_dir: str, words: Sequence[str] = WORDS, extra_tokens: Sequence[str] = ()) -> int:
    """A word-level tokenizer over ``words`` (+ ``extra_tokens`` as added special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(words) + list(extra_tokens))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if extra_tokens:
        fast.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    fast.save_pretrained(out_dir)
    return len(vocab)


def tiny_llama(*, hidden: int = 64, layers: int = 4, intermediate: int = 176, vocab: int = 256, heads: int = 4,
               kv_heads: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised Llama causal LM (seeded)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.config.torch_dtype = dtype
    return model


def perturb(model, seed: int, scale: float = 0.02):
    """A 'fine-tune': every weight nudged by seeded Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g) * scale * (p.float().std() + 1e-3)
                p.add_(noise.to(p.dtype))
    return model


def save_model(model, out_dir: str, *, shard: Optional[str] = None, extra_tokens: Sequence[str] = ()) -> str:
    """Save weights (safetensors) and a tokenizer, atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp, safe_serialization=True, **kw)
    save_tokenizer(tmp, extra_tokens=extra_tokens)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def make_finetunes(base, out_dir: str, prefix: str, n_finetunes: int, seed: int, build) -> dict[str, str]:
    """Save ``base`` as ``{prefix}_base`` and ``n_finetunes`` perturbed copies (``build()`` makes an empty one)."""
    paths = {"base": save_model(base, os.path.join(out_dir, f"{prefix}_base"))}
    for i in range(n_finetunes):
        ft = build()
        ft.load_state_dict(base.state_dict())
        perturb(ft, seed=seed * 1000 + 100 + i)
        paths[f"ft{i}"] = save_model(ft, os.path.join(out_dir, f"{prefix}_ft{i}"))
    return paths


def make_demo_models(out_dir: str, n_finetunes: int = 2, seed: int = 0) -> dict[str, str]:
    """The demo's Llama base and fine-tunes under out_dir/llama_base, llama_ft0, ..."""
    build = lambda: tiny_llama(seed=seed, **DEMO_SHAPE)  # noqa: E731
    return make_finetunes(build(), out_dir, "llama", n_finetunes, seed, build)
