"""Small models made locally (random weights, a tokenizers-built tokenizer).

Used by the demo (`ray-merge demo`), the tests and the benchmarks: nothing here is
downloaded. Deterministic given the seed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional, Sequence

import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(252)]


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


def build_model(kind: str = "llama", *, hidden: int = 64, layers: int = 4, intermediate: int = 176,
                vocab: int = 256, heads: int = 4, kv_heads: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised causal LM of the given family."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                                       tie_word_embeddings=False, **common)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=kv_heads, **common)
        cls = transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                                       tie_word_embeddings=True, **common)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=256)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    model = cls(cfg).to(dtype)
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


def make_family(out_dir: str, kind: str = "llama", n_finetunes: int = 3, seed: int = 0, **model_kw) -> dict[str, str]:
    """A base model and ``n_finetunes`` perturbed copies, under out_dir/{kind}_base, {kind}_ft0..."""
    paths = {}
    base = build_model(kind, seed=seed, **model_kw)
    paths["base"] = save_model(base, os.path.join(out_dir, f"{kind}_base"))
    for i in range(n_finetunes):
        ft = build_model(kind, seed=seed, **model_kw)
        ft.load_state_dict(base.state_dict())
        perturb(ft, seed=seed * 1000 + 100 + i)
        paths[f"ft{i}"] = save_model(ft, os.path.join(out_dir, f"{kind}_ft{i}"))
    return paths
