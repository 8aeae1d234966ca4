"""Build the tiny demo models used to show evolutionary merge search on CPU.

Three Llama-architecture causal LMs (4 layers, hidden 128, 2 heads, 0.66M
parameters) are trained from scratch on CPU in about four minutes:

* ``base``       -- pretrained on a mix of both task formats, then briefly
                    trained on wrong answers of the right shape ("scrambled"):
                    it knows the formats but gets (almost) no answer right.
* ``ft_arith``   -- ``base`` fine-tuned on additions  (``12+7=19``).
* ``ft_reverse`` -- ``base`` fine-tuned on reversals  (``rev abcd = dcba``).

Each fine-tune is good at its own skill and poor at the other.  The plain
average of the two is no better than either fine-tune (it keeps reversal and
loses addition), while task arithmetic (base + both deltas) beats both on the
summed score: there is something for a search over merge parameters to find.
Seed 0 on the search split: base 0.01/0.09 (addition/reversal), ft_arith
0.965/0.085, ft_reverse 0.01/1.0, average 0.08/0.98, task arithmetic 0.59/1.0.  See the comment above
``STAGES`` for why the base is made this way.

The tokenizer is character level (``tokenizers`` WordLevel over single
characters, wrapped in ``PreTrainedTokenizerFast``); it adds ``<bos>`` to every
encoded text, like Llama's.  head_dim is 64 because vLLM's CPU attention
rejects smaller head sizes.

The held-out evaluation examples (``configs/evolve/tasks/data/*.jsonl``, read
by the lm-eval tasks ``demo_arith`` / ``demo_reverse`` and their ``_final``
twins) are drawn from a fixed seed that does not depend on ``--seed`` and are
never trained on.  ``--write-task-data`` regenerates those files.

Usage (scripts/make_demo_models.py runs this module's ``main``)::

    python scripts/make_demo_models.py [--out demo_models] [--seed 0] [--force]

Outputs are written to a temporary directory next to ``--out`` and renamed into
place when complete, so an existing complete output (same seed and recipe
version) is reused as is.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "demo_models"
TASK_DATA_DIR = REPO_ROOT / "configs" / "evolve" / "tasks" / "data"

# Bump when anything that changes the produced weights changes, so that stale
# caches (RAY_MERGE_DEMO_MODELS, demo_models/) are rebuilt.
RECIPE_VERSION = 2
MODEL_NAMES = ("base", "ft_arith", "ft_reverse")
MANIFEST = "manifest.json"

# --------------------------------------------------------------------------- #
# Tasks
# --------------------------------------------------------------------------- #

ARITH_MAX = 49  # operands are 0..ARITH_MAX
REV_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
REV_MIN_LEN, REV_MAX_LEN = 3, 5

# Held-out examples: drawn with this fixed seed, independent of --seed.
HELDOUT_SEED = 20240613
HELDOUT_SPLITS = {"search": 200, "final": 200}  # split name -> examples per task


def arith_example(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def reverse_example(s: str) -> dict[str, str]:
    return {"prompt": f"rev {s} = ", "answer": s[::-1]}


def _random_word(rng: random.Random) -> str:
    n = rng.randint(REV_MIN_LEN, REV_MAX_LEN)
    return "".join(rng.choice(REV_ALPHABET) for _ in range(n))


def heldout_examples() -> dict[str, dict[str, list[dict[str, str]]]]:
    """{task: {split: [example, ...]}} -- the fixed evaluation examples."""
    rng = random.Random(HELDOUT_SEED)
    total = sum(HELDOUT_SPLITS.values())

    pairs = [(a, b) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]
    rng.shuffle(pairs)
    arith = [arith_example(a, b) for a, b in pairs[:total]]

    words: list[str] = []
    seen: set[str] = set()
    while len(words) < total:
        w = _random_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    reverse = [reverse_example(w) for w in words]

    out: dict[str, dict[str, list[dict[str, str]]]] = {"arith": {}, "reverse": {}}
    start = 0
    for split, n in HELDOUT_SPLITS.items():
        out["arith"][split] = arith[start : start + n]
        out["reverse"][split] = reverse[start : start + n]
        start += n
    return out


def write_task_data(data_dir: Path = TASK_DATA_DIR) -> list[Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, splits in heldout_examples().items():
        for split, examples in splits.items():
            path = data_dir / f"{task}_{split}.jsonl"
            with open(path, "w") as f:
                for ex in examples:
                    f.write(json.dumps(ex) + "\n")
            written.append(path)
    return written


class TaskSampler:
    """Draws training examples, never one of the held-out examples."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        held = heldout_examples()
        self.excluded = {
            ex["prompt"] for splits in held.values() for exs in splits.values() for ex in exs
        }

    def arith(self) -> dict[str, str]:
        while True:
            ex = arith_example(self.rng.randint(0, ARITH_MAX), self.rng.randint(0, ARITH_MAX))
            if ex["prompt"] not in self.excluded:
                return ex

    def reverse(self) -> dict[str, str]:
        while True:
            ex = reverse_example(_random_word(self.rng))
            if ex["prompt"] not in self.excluded:
                return ex


# --------------------------------------------------------------------------- #
# Tokenizer and model
# --------------------------------------------------------------------------- #

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz+= \n-*,.")  # 48 tokens in all
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def build_tokenizer():
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_attention_heads: int = 2  # head_dim 64: vLLM CPU rejects smaller heads
    num_hidden_layers: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64


def build_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Stage:
    name: str
    mix: float  # fraction of arithmetic examples in each batch
    steps: int
    lr: float
    prompt_loss: bool  # also train on the prompt tokens (pretraining) or not (SFT)
    batch_size: int = 64
    warmup: int = 20
    # Keep the model's behaviour on the *other* task close to the starting
    # model's: KL(start || model) on a replay batch of other-task sequences,
    # weighted by kl_weight.  This keeps the two fine-tunes from fighting
    # over shared weights, which is what lets a merge of them work.
    kl_weight: float = 0.0
    kl_batch_size: int = 32
    # Train on wrong answers of the right shape (a random sum, a shuffle of
    # the letters): the model keeps the format and forgets the skill.
    scramble: bool = False


# Why the base is made in two stages.  A base pretrained only briefly (150
# steps) is weak at both skills as wanted, but then each fine-tune has to
# learn its skill from scratch: its weight delta is as large as the weights
# themselves, and no merge of the two fine-tunes (linear, task arithmetic,
# TIES-style trimming) scores above ~0.2 of the 2.0 possible.  Instead the
# base is pretrained until it has both skills, then "scrambled": trained
# briefly on answers of the right shape but wrong content, so it keeps the
# format and the machinery but answers (almost) nothing right.  Each
# fine-tune then only has to re-aim the machinery at its own skill -- a small
# delta -- and, with the KL term keeping its behaviour on the other task at
# the base's, the two deltas add up: task arithmetic of the two beats both.
STAGES = {
    "pretrain": Stage("pretrain", mix=0.5, steps=1200, lr=2e-3, prompt_loss=True, warmup=50),
    "scramble": Stage("scramble", mix=0.5, steps=60, lr=1e-3, prompt_loss=False, scramble=True),
    "ft_arith": Stage("ft_arith", mix=1.0, steps=300, lr=5e-4, prompt_loss=False, kl_weight=1.0),
    "ft_reverse": Stage("ft_reverse", mix=0.0, steps=300, lr=5e-4, prompt_loss=False, kl_weight=1.0),
}


def encode_example(ex: dict[str, str], prompt_loss: bool) -> tuple[list[int], list[int]]:
    prompt = [BOS_ID] + [CHARS.index(c) + len(SPECIAL_TOKENS) for c in ex["prompt"]]
    answer = [CHARS.index(c) + len(SPECIAL_TOKENS) for c in ex["answer"]] + [EOS_ID]
    ids = prompt + answer
    labels = list(ids) if prompt_loss else [-100] * len(prompt) + answer
    return ids, labels


def scrambled(ex: dict[str, str], rng: random.Random) -> dict[str, str]:
    """The example with a wrong answer of the right shape."""
    if ex["prompt"].startswith("rev "):
        letters = list(ex["answer"])
        rng.shuffle(letters)
        return {"prompt": ex["prompt"], "answer": "".join(letters)}
    return {"prompt": ex["prompt"], "answer": str(rng.randint(0, 2 * ARITH_MAX))}


def make_batch(sampler: TaskSampler, stage: Stage, replay: bool = False):
    """A right-padded batch of the stage's task mix, or with ``replay`` a
    batch of the *other* task (for the KL term)."""
    rows = []
    n = stage.kl_batch_size if replay else stage.batch_size
    for _ in range(n):
        arith = sampler.rng.random() < stage.mix
        if replay:
            arith = not arith
        ex = sampler.arith() if arith else sampler.reverse()
        if stage.scramble and not replay:
            ex = scrambled(ex, sampler.rng)
        rows.append(encode_example(ex, True if replay else stage.prompt_loss))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, : len(r_ids)] = torch.tensor(r_ids)
        labels[i, : len(r_labels)] = torch.tensor(r_labels)
    return ids, labels


def train(model, stage: Stage, seed: int, log=print) -> None:
    """Train in place. Right padding only, so no attention mask is needed:
    padded positions come after every real token and carry no loss."""
    torch.manual_seed(seed)
    sampler = TaskSampler(random.Random(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < stage.warmup:
            return stage.lr * (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return stage.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    ref = None
    if stage.kl_weight > 0:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)

    model.train()
    t0 = time.time()
    for step in range(stage.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = make_batch(sampler, stage)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        if ref is not None:
            r_ids, r_labels = make_batch(sampler, stage, replay=True)
            mask = (r_labels[:, 1:] != -100).float()
            with torch.no_grad():
                ref_logp = F.log_softmax(ref(input_ids=r_ids).logits[:, :-1], dim=-1)
            logp = F.log_softmax(model(input_ids=r_ids).logits[:, :-1], dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            loss = loss + stage.kl_weight * (kl * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == stage.steps - 1:
            log(f"  [{stage.name}] step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()


# --------------------------------------------------------------------------- #
# Quick evaluation (plain torch greedy decoding; lm-eval lives in evolve/demo_eval.py)
# --------------------------------------------------------------------------- #


def greedy_accuracy(model, examples: list[dict[str, str]], max_new_tokens: int = 8) -> float:
    """Exact-match accuracy of greedy completions.  Prompts are grouped by
    length so no padding is needed."""
    by_len: dict[int, list[tuple[list[int], str]]] = {}
    for ex in examples:
        ids, _ = encode_example({"prompt": ex["prompt"], "answer": ""}, True)
        ids = ids[:-1]  # drop the EOS that encode_example appends to the (empty) answer
        by_len.setdefault(len(ids), []).append((ids, ex["answer"]))
    correct = 0
    with torch.no_grad():
        for rows in by_len.values():
            x = torch.tensor([ids for ids, _ in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            out: list[list[int]] = [[] for _ in rows]
            for _ in range(max_new_tokens):
                nxt = model(input_ids=x).logits[:, -1].argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        if t == EOS_ID:
                            done[i] = True
                        else:
                            out[i].append(t)
                if bool(done.all()):
                    break
                x = torch.cat([x, nxt[:, None]], dim=1)
            for (_, answer), toks in zip(rows, out):
                text = "".join(
                    CHARS[t - len(SPECIAL_TOKENS)] for t in toks if t >= len(SPECIAL_TOKENS)
                )
                correct += int(text.strip() == answer)
    return correct / len(examples)


def quick_scores(model, split: str = "search") -> dict[str, float]:
    held = heldout_examples()
    return {task: greedy_accuracy(model, held[task][split]) for task in ("arith", "reverse")}


def merged_state_dict(base_sd, sds, weights):
    """base + sum_i w_i * (sd_i - base): task arithmetic (linear when the
    weights sum to 1)."""
    out = {}
    for k, b in base_sd.items():
        out[k] = b + sum(w * (sd[k] - b) for sd, w in zip(sds, weights))
    return out


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #


def is_complete(out: Path, seed: int | None = None) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("recipe_version") != RECIPE_VERSION:
        return False
    if seed is not None and meta.get("seed") != seed:
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((out / name / f).is_file() for name in MODEL_NAMES for f in needed)


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # Name the class that every transformers version knows (v5 writes
    # "TokenizersBackend", which v4 -- e.g. an older vLLM's -- cannot load).
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def build(out: Path, seed: int, shape: ModelShape = ModelShape(), threads: int = 1, log=print) -> dict:
    """Train the three models into a temporary directory and rename it to
    ``out``.  Returns the manifest.  Sets torch's thread count for the
    duration only."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(out, seed, shape, threads, log)
    finally:
        torch.set_num_threads(prev_threads)


def _build(out: Path, seed: int, shape: ModelShape, threads: int, log) -> dict:
    from transformers import LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    t_start = time.time()
    try:
        tokenizer = build_tokenizer()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(build_config(shape)).float()
        timings: dict[str, float] = {}

        t0 = time.time()
        train(model, STAGES["pretrain"], seed=seed, log=log)
        timings["pretrain"] = time.time() - t0
        t0 = time.time()
        train(model, STAGES["scramble"], seed=seed + 10, log=log)
        timings["scramble"] = time.time() - t0
        base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save(model, tokenizer, tmp / "base")

        sds = {}
        for i, name in enumerate(("ft_arith", "ft_reverse")):
            model.load_state_dict(base_sd)
            t0 = time.time()
            train(model, STAGES[name], seed=seed + 1 + i, log=log)
            timings[name] = time.time() - t0
            sds[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _save(model, tokenizer, tmp / name)

        # Quick check that the demo makes sense: fine-tunes beat the base on
        # their own skill, and a merge is plausibly better on the sum.
        t0 = time.time()
        scores = {}
        candidates = {
            "base": base_sd,
            "ft_arith": sds["ft_arith"],
            "ft_reverse": sds["ft_reverse"],
            "linear_0.5": merged_state_dict(base_sd, [sds["ft_arith"], sds["ft_reverse"]], [0.5, 0.5]),
            "task_arith_0.8": merged_state_dict(base_sd, [sds["ft_arith"], sds["ft_reverse"]], [0.8, 0.8]),
            "task_arith_1.0": merged_state_dict(base_sd, [sds["ft_arith"], sds["ft_reverse"]], [1.0, 1.0]),
        }
        for name, sd in candidates.items():
            model.load_state_dict(sd)
            model.eval()
            scores[name] = quick_scores(model)
        timings["quick_eval"] = time.time() - t0
        timings["total"] = time.time() - t_start

        manifest = {
            "recipe_version": RECIPE_VERSION,
            "seed": seed,
            "shape": asdict(shape),
            "stages": {k: asdict(v) for k, v in STAGES.items()},
            "quick_scores_search_split": scores,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__,
            "threads": threads,  # float sums, hence the exact weights, depend on it
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Keep the generated weights out of git wherever they land.
        (tmp / ".gitignore").write_text("*\n")

        if out.exists():
            if is_complete(out, seed):  # a concurrent run finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return json.loads((out / MANIFEST).read_text())
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}-stale-", dir=out.parent))
            os.rename(out, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_demo_models(
    out: Path | str = DEFAULT_OUT, seed: int = 0, force: bool = False, threads: int = 1, log=print
) -> Path:
    """Build the demo models into ``out`` unless a complete build is there."""
    out = Path(out).resolve()
    if not force and is_complete(out, seed):
        log(f"demo models already complete in {out}")
        return out
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no {MANIFEST}: refusing to replace it")
    build(out, seed, threads=threads, log=log)
    return out


def format_scores(scores: dict[str, dict[str, float]]) -> str:
    lines = [f"{'model':<16} {'arith':>7} {'reverse':>7} {'sum':>7}"]
    for name, s in scores.items():
        lines.append(f"{name:<16} {s['arith']:>7.3f} {s['reverse']:>7.3f} {s['arith'] + s['reverse']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: demo_models/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if complete outputs exist")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the matrices are tiny, and with the 2 cores shared with other "
        "work 2 threads measured 11x slower than 1)",
    )
    p.add_argument(
        "--write-task-data",
        action="store_true",
        help=f"only (re)write the held-out JSONL files into {TASK_DATA_DIR.relative_to(REPO_ROOT)}",
    )
    args = p.parse_args(argv)

    if args.write_task_data:
        for path in write_task_data():
            print(path)
        return 0

    out = ensure_demo_models(args.out, args.seed, args.force, threads=args.threads)
    meta = json.loads((out / MANIFEST).read_text())
    print(f"models in {out}")
    print(format_scores(meta["quick_scores_search_split"]))
    print("timings (s):", meta["timings_s"])
    return 0
