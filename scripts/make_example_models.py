#!/usr/bin/env python3
"""Build small local models for the offline examples (configs/moe/offline-*.yml, configs/multi/offline-*.yml,
the extract-lora example in the README): nothing is downloaded.

    python scripts/make_example_models.py --out examples_models [--seed 0] [--force]

Writes, under --out:

- ``base``: a Llama-architecture causal LM (4 layers, hidden 64, 0.2M parameters, bfloat16) with random
  weights and a word-level tokenizer over a small English vocabulary (the prompts in the offline configs use
  these words);
- ``ft-math``, ``ft-code``, ``ft-chat``: three "fine-tunes" of it. Each adds to every linear weight a change of
  rank 4 (as a LoRA fine-tune would) plus a little full-rank noise, and nudges the norms and embeddings.

The weights are random, so the merged models are not useful as language models: they show the commands
working end to end, and their outputs load with transformers like a real model's. Seeded: the same seed and
library versions give the same files. Existing complete models are kept unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

NAMES = ("base", "ft-math", "ft-code", "ft-chat")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = """
the a an and or but not of to in on at for with from by as is are was were be been it this that these those
i you he she we they me my your our their who what when where why how which hello hi thanks please help
yes no can could would should will may might must do does did done have has had make made get got give
write read code python function class def return import print list dict string number value variable loop
bug error fix test compile run program file data array sort search algorithm compute solve equation
integral derivative sum product plus minus times divided equals math proof theorem prime root square
x y z zero one two three four five six seven eight nine ten hundred thousand answer question problem
story tell once upon time dragon castle king queen hero adventure quest sword magic forest night day
doctor patient medicine health symptom treatment disease heart blood pain fever care hospital
chat friend talk say said reply message assistant user system good bad new old big small first last
ich bin du ist das ein eine der die und nicht wie geht es dir satz auf deutsch danke
""".split()
PUNCT = list(".,:;!?()[]{}<>=+-*/'\"#_|%&")
DIGITS = list("0123456789")
VOCAB_SIZE = 256
CONFIG = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def vocabulary() -> list[str]:
    tokens = []
    for t in SPECIAL + PUNCT + DIGITS + WORDS:
        if t not in tokens:
            tokens.append(t)
    if len(tokens) > VOCAB_SIZE:
        raise SystemExit(f"vocabulary too large: {len(tokens)} > {VOCAB_SIZE}")
    tokens += [f"<extra_{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    return tokens


def save_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocabulary())}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)


def new_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=3, **CONFIG)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def fine_tune(model, seed: int, rank: int = 4) -> None:
    """Low-rank changes to the 2-D weights (scaled to ~5% of each weight's RMS), small noise elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in sorted(model.state_dict().items()):
            if not w.is_floating_point():
                continue
            x = w.float()
            rms = x.pow(2).mean().sqrt().item() or 1.0
            if x.dim() == 2:
                a = torch.randn(x.shape[0], rank, generator=gen)
                b = torch.randn(rank, x.shape[1], generator=gen)
                change = (a @ b) * (0.05 * rms / rank ** 0.5)
                change += torch.randn(x.shape, generator=gen) * (0.002 * rms)
            else:
                change = torch.randn(x.shape, generator=gen) * (0.02 * rms)
            w.copy_((x + change).to(w.dtype))


def save(model, path: str) -> None:
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def complete(out: str, seed: int) -> bool:
    try:
        with open(os.path.join(out, "examples.json")) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("seed") == seed and all(os.path.isfile(os.path.join(out, n, "config.json")) for n in NAMES)


def build(out: str, seed: int = 0, force: bool = False) -> str:
    out = os.path.abspath(out)
    if not force and complete(out, seed):
        print(f"example models already in {out}")
        return out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    base = new_model()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    save(base, os.path.join(out, "base"))
    for i, name in enumerate(NAMES[1:]):
        model = new_model()
        model.load_state_dict(state)
        fine_tune(model, seed=seed * 1000 + i + 1)
        save(model, os.path.join(out, name))
    with open(os.path.join(out, "examples.json"), "w") as f:
        json.dump({"seed": seed, "models": list(NAMES), "torch": torch.__version__}, f, indent=1)
    print(f"example models written to {out}: {', '.join(NAMES)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="examples_models", help="output directory (default examples_models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if complete models are there")
    args = p.parse_args(argv)
    build(args.out, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
