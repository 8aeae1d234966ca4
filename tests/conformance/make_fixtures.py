"""Build the small models that the conformance recipes (tests/recipes/*.yml) merge.

    python tests/conformance/make_fixtures.py OUT_DIR

Needs only torch, transformers and tokenizers, so it runs under the mergekit side venv's python (as
tests/test_conformance.py runs it) as well as under the project's. Everything is seeded: the same
versions give the same bytes. A recipe names the models as FIX/<name>; the names are:

- ``{llama,mistral,qwen2,gpt2}_base`` and ``_ft0`` .. ``_ft2``: a random base and three "fine-tunes" of it
  (Gaussian changes to every entry plus a few large spikes per tensor, so magnitude-based methods have a
  tail to cut). Llama unties its embeddings, Qwen2 ties them and has attention biases, GPT-2 uses fused
  Conv1D weights and other tensor names.
- ``llama_sharded_*``: the Llama family again, saved in ~40 KB shards (index file, many shards).
- ``smooth_base``, ``smooth_ft0``, ``smooth_ft1``: Gaussian changes only, so the statistics that the
  randomised methods' cases (``*_stat``) compare are stable.
- ``llama_chatml``: a Llama fine-tune whose vocabulary has two more tokens (for tokenizer cases).
- ``llama_padded``: a Llama fine-tune whose tokenizer lists four ``<UNUSED_i>`` tokens past its 256
  embedding rows (mergekit's tokenizer tests' "padded" model).
- ``granite_base``, ``granite_ft0``, ``granite_ft1``: IBM Granite (its embedding / residual / logits
  multipliers in config.json), and ``llava_*`` likewise: a LLaVA vision-language model (CLIP vision tower,
  projector, Llama text model) - the kinds mergekit's own test suite merges besides Llama and GPT-2.

All weights are bfloat16 (like most published checkpoints); the tokenizer is word level over 256 tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

VOCAB = 256
SIZES = dict(hidden=64, layers=4, intermediate=176)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def write_tokenizer(path: str, added: tuple = ()) -> None:
    """A word-level tokenizer: four special tokens, then t4 .. t255, then ``added``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>", "<pad>"] + [f"t{i}" for i in range(4, VOCAB)] + list(added)
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(path)


def new_model(kind: str, vocab: int = VOCAB):
    """A randomly initialised bf16 causal LM of one family (the global torch seed decides the weights)."""
    import transformers as tf

    h, n, inter = SIZES["hidden"], SIZES["layers"], SIZES["intermediate"]
    decoder = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=n, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **decoder))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**decoder))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=True, **decoder))
    elif kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(tie_word_embeddings=False, **decoder))
    elif kind == "llava":
        vision = tf.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                                     hidden_size=h, intermediate_size=2 * h)
        text = tf.LlamaConfig(tie_word_embeddings=False, **decoder)
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text,
                                                                image_seq_length=16))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=h, n_layer=n, n_head=4, vocab_size=vocab, n_positions=128))
    else:
        raise SystemExit(f"make_fixtures: unknown family {kind!r}")
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    return model


def fine_tune(model, seed: int, noise: float, spikes: bool):
    """Change every floating-point tensor in place: Gaussian noise at ``noise`` times the tensor's RMS, and
    (with ``spikes``) about one entry in a thousand moved by a large amount."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            values = tensor.float()
            rms = values.pow(2).mean().sqrt().item() or 1.0
            change = torch.randn(values.shape, generator=gen) * (noise * rms)
            if spikes:
                flat = change.view(-1)
                count = max(1, flat.numel() // 1000)
                where = torch.randperm(flat.numel(), generator=gen)[:count]
                flat[where] += torch.randn(count, generator=gen) * 0.5
            tensor.copy_((values + change).to(tensor.dtype))
    return model


def save(model, path: str, shard: str | None = None, added: tuple = ()) -> None:
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    write_tokenizer(tmp, added)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def family(out: str, name: str, kind: str, seed: int, fine_tunes: int, *, noise: float = 0.02,
           spikes: bool = True, shard: str | None = None) -> list[str]:
    torch.manual_seed(seed)
    base = new_model(kind)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    save(base, os.path.join(out, f"{name}_base"), shard)
    written = [f"{name}_base"]
    for i in range(fine_tunes):
        model = new_model(kind)
        model.load_state_dict(base_state)
        fine_tune(model, seed=seed * 100 + i + 1, noise=noise, spikes=spikes)
        save(model, os.path.join(out, f"{name}_ft{i}"), shard)
        written.append(f"{name}_ft{i}")
    return written


def chatml_variant(out: str, seed: int) -> str:
    """The Llama base with two more vocabulary rows (new random rows), then fine-tuned."""
    torch.manual_seed(seed)
    base = new_model("llama")
    grown = new_model("llama", vocab=VOCAB + len(CHATML_TOKENS))
    state = grown.state_dict()
    with torch.no_grad():
        for key, value in base.state_dict().items():
            state[key][: value.shape[0]].copy_(value)
    grown.load_state_dict(state)
    fine_tune(grown, seed=seed * 100 + 99, noise=0.02, spikes=True)
    save(grown, os.path.join(out, "llama_chatml"), added=CHATML_TOKENS)
    return "llama_chatml"


def padded_variant(out: str, seed: int) -> str:
    """The Llama base, fine-tuned, with four tokenizer entries that have no embedding row."""
    torch.manual_seed(seed)
    model = fine_tune(new_model("llama"), seed=seed * 100 + 98, noise=0.02, spikes=True)
    save(model, os.path.join(out, "llama_padded"), added=tuple(f"<UNUSED_{i}>" for i in range(4)))
    return "llama_padded"


def build(out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    names = []
    names += family(out, "llama", "llama", seed=11, fine_tunes=3)
    names += family(out, "llama_sharded", "llama", seed=11, fine_tunes=3, shard="40KB")
    names += family(out, "mistral", "mistral", seed=12, fine_tunes=3)
    names += family(out, "qwen2", "qwen2", seed=13, fine_tunes=3)
    names += family(out, "gpt2", "gpt2", seed=14, fine_tunes=3)
    names += family(out, "smooth", "llama", seed=15, fine_tunes=2, noise=0.05, spikes=False)
    names.append(chatml_variant(out, seed=11))
    names.append(padded_variant(out, seed=11))
    names += family(out, "granite", "granite", seed=16, fine_tunes=2)
    names += family(out, "llava", "llava", seed=17, fine_tunes=2)
    with open(os.path.join(out, "fixtures.json"), "w") as f:
        json.dump({"models": names, "torch": torch.__version__}, f, indent=1)
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(f"{len(build(sys.argv[1]))} models written to {sys.argv[1]}")
