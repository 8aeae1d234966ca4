"""Small models of several architectures for the tests (random weights, built locally)."""
from __future__ import annotations

import torch

from ray_merge.demo import WORDS, make_finetunes, perturb, save_model, save_tokenizer, tiny_llama

__all__ = ["WORDS", "build_model", "make_family", "perturb", "save_model", "save_tokenizer"]


def build_model(kind: str = "llama", *, hidden: int = 64, layers: int = 4, intermediate: int = 176,
                vocab: int = 256, heads: int = 4, kv_heads: int = 2, dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialised causal LM of the given family."""
    import transformers

    if kind == "llama":
        return tiny_llama(hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, heads=heads,
                          kv_heads=kv_heads, dtype=dtype, seed=seed)
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=256)
    if kind == "mistral":
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


def make_family(out_dir: str, kind: str = "llama", n_finetunes: int = 3, seed: int = 0, **model_kw) -> dict[str, str]:
    """A base model and ``n_finetunes`` perturbed copies, under out_dir/{kind}_base, {kind}_ft0..."""
    build = lambda: build_model(kind, seed=seed, **model_kw)  # noqa: E731
    return make_finetunes(build(), out_dir, kind, n_finetunes, seed, build)
