"""Models of the honest evolution benchmark (``python -m evolve.bench``): one base, two plain fine-tunes.

The CPU demo (evolve/demo_models.py) was built so that merging works: its base was pretrained on the two demo
tasks and then scrambled, and each fine-tune was penalised for changing the other task's answers.  This module
builds the same kind of setup the way real merges are made, with none of that:

* ``base`` -- a Llama-architecture char-level LM (4 layers, hidden 192, 3 heads of 64, MLP 384; 1.5M
  parameters, 2.3x the demo's: what 2 shared CPU cores train in minutes) pretrained from scratch (``PRETRAIN``:
  1500 steps of 64, peak learning rate 2e-3), with the loss on every token, on a mixed corpus
  of generic string and digit tasks written ``<op> <args> = <answer>``: copying, shifting letters, sorting,
  counting a character, length, first/last character, rotating, deleting a character, doubling characters,
  every other character, removing repeats, incrementing/decrementing a number, the larger of two numbers and
  key-value lookup (``PRETRAIN_OPS``).  It never sees the benchmark tasks (additions ``add 12 34 = 46`` and
  reversals ``rev abcd = dcba``): neither their op names nor their input -> answer maps are in the corpus,
  but the representations they need (digits, carries in ``inc``, positions counted from the end in ``lst``
  and ``rot``) are.  This is what a broadly pretrained base is to a fine-tune: a model that knows the
  ingredients, not the task.
* ``ft_add`` / ``ft_rev`` -- ``base`` fine-tuned on its own task only (supervised: loss on the answer
  tokens), AdamW without weight decay, warmup then cosine decay (``FINETUNE``: 1200 steps of 32, peak learning
  rate 1e-3, half of pretraining's) -- an ordinary full fine-tune.  No replay of other data, no penalty, no
  term involving the other task.  The two fine-tunes get the same recipe; only the task and the data seed
  differ.

The fine-tuning recipe was chosen by one criterion only: each fine-tune must be good at its own task (see
the manifest's ``quick_scores_search_split``), which is what a person training one aims for.  A first recipe
(300 steps at 2e-4) left ft_add at 0.03 on addition -- addition is new to the base -- so it was lengthened and
its learning rate raised until ft_add learned its task (0.91); nothing in it was tuned on any merge's score.
The price is large task vectors (the weights move by about a quarter to a third of their norm), which is
what the benchmark then shows merges cannot recombine.

Held-out data: for each task, a ``search`` split (the fitness of the evolutionary search and the split on
which hand-written merge settings are chosen) and a ``final`` split (reported, never used for any choice),
drawn from a fixed seed independent of ``--seed`` and excluded from fine-tuning data.  They are written to
``configs/evolve/bench/tasks/data/`` (``--write-task-data``) and read by the lm-eval tasks there.

Tokenizer: character level, adds ``<bos>`` (as evolve/demo_models.py).  Training uses 1 torch thread by
default: the exact weights depend on the thread count and on the CPU's float kernels, so two machines can
produce different models from the same seed -- the benchmark reports several seeds for that reason.

Usage::

    python -m evolve.bench_models [--out bench_models] [--seed 0] [--force] [--write-task-data]

Outputs land in a temporary directory renamed into place when complete; a complete build of the same recipe
version and seed is reused.  ``$RAY_MERGE_BENCH_MODELS`` overrides the default directory (``bench_models/``).
"""

from __future__ import annotations

import argparse
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
DEFAULT_OUT = REPO_ROOT / "bench_models"
ENV_VAR = "RAY_MERGE_BENCH_MODELS"
TASK_DATA_DIR = REPO_ROOT / "configs" / "evolve" / "bench" / "tasks" / "data"

# Bump when anything that changes the produced weights changes (stale caches are rebuilt).  BASE_VERSION
# covers the base alone: a build whose base stamp and seed match keeps its base and retrains only the
# fine-tunes (pretraining is most of the build time).
RECIPE_VERSION = 2
BASE_VERSION = 1
FINETUNES = ("ft_add", "ft_rev")
MODEL_NAMES = ("base",) + FINETUNES
MANIFEST = "manifest.json"

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

# --------------------------------------------------------------------------- #
# Benchmark tasks (never in pretraining)
# --------------------------------------------------------------------------- #

ADD_MAX = 99  # operands 0..99
REV_MIN_LEN, REV_MAX_LEN = 3, 7
HELDOUT_SEED = 20250111
HELDOUT_SPLITS = {"search": 200, "final": 400}  # examples per task
TASKS = ("add", "rev")


def add_example(a: int, b: int) -> dict[str, str]:
    return {"prompt": f"add {a} {b} = ", "answer": str(a + b)}


def rev_example(w: str) -> dict[str, str]:
    return {"prompt": f"rev {w} = ", "answer": w[::-1]}


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def heldout_examples() -> dict[str, dict[str, list[dict[str, str]]]]:
    """{task: {split: [example, ...]}}: fixed, disjoint, never trained on."""
    rng = random.Random(HELDOUT_SEED)
    total = sum(HELDOUT_SPLITS.values())
    pairs = [(a, b) for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    rng.shuffle(pairs)
    adds = [add_example(a, b) for a, b in pairs[:total]]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < total:
        w = _word(rng, REV_MIN_LEN, REV_MAX_LEN)
        if w not in seen and w != w[::-1]:  # a palindrome's answer is its copy
            seen.add(w)
            words.append(w)
    revs = [rev_example(w) for w in words]
    out: dict[str, dict[str, list[dict[str, str]]]] = {"add": {}, "rev": {}}
    start = 0
    for split, n in HELDOUT_SPLITS.items():
        out["add"][split] = adds[start:start + n]
        out["rev"][split] = revs[start:start + n]
        start += n
    return out


def write_task_data(data_dir: Path = TASK_DATA_DIR) -> list[Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, splits in heldout_examples().items():
        for split, examples in splits.items():
            path = data_dir / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
            written.append(path)
    return written


# --------------------------------------------------------------------------- #
# Pretraining corpus: generic string and digit tasks
# --------------------------------------------------------------------------- #


def _num(rng: random.Random, hi: int = 999) -> int:
    return rng.randint(0, hi)


def _pt_cpy(rng):
    w = _word(rng, 1, 8, rng.choice((LETTERS, DIGITS)))
    return f"cpy {w} = ", w


def _pt_nxt(rng):
    w = _word(rng, 1, 7)
    return f"nxt {w} = ", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _pt_srt(rng):
    w = _word(rng, 2, 8, rng.choice((LETTERS, DIGITS)))
    return f"srt {w} = ", "".join(sorted(w))


def _pt_cnt(rng):
    w = _word(rng, 1, 9, "abcde")
    c = rng.choice("abcde")
    return f"cnt {c} {w} = ", str(w.count(c))


def _pt_len(rng):
    w = _word(rng, 1, 9)
    return f"len {w} = ", str(len(w))


def _pt_fst(rng):
    w = _word(rng, 1, 8)
    return f"fst {w} = ", w[0]


def _pt_lst(rng):
    w = _word(rng, 1, 8)
    return f"lst {w} = ", w[-1]


def _pt_rot(rng):
    w = _word(rng, 2, 8)
    return f"rot {w} = ", w[1:] + w[0]


def _pt_del(rng):
    w = _word(rng, 2, 8, "abcdefgh")
    c = rng.choice(w)
    return f"del {c} {w} = ", w.replace(c, "")


def _pt_dbl(rng):
    w = _word(rng, 1, 5)
    return f"dbl {w} = ", "".join(c + c for c in w)


def _pt_evn(rng):
    w = _word(rng, 2, 9)
    return f"evn {w} = ", w[::2]


def _pt_unq(rng):
    w = _word(rng, 2, 9, "abcd")
    out = "".join(c for i, c in enumerate(w) if i == 0 or c != w[i - 1])
    return f"unq {w} = ", out


def _pt_inc(rng):
    n = _num(rng)
    return f"inc {n} = ", str(n + 1)


def _pt_dec(rng):
    n = rng.randint(1, 1000)
    return f"dec {n} = ", str(n - 1)


def _pt_max(rng):
    a, b = _num(rng, 199), _num(rng, 199)
    return f"max {a} {b} = ", str(max(a, b))


def _pt_get(rng):
    keys = rng.sample(LETTERS, rng.randint(2, 5))
    vals = [rng.choice(DIGITS) for _ in keys]
    k = rng.randrange(len(keys))
    table = " ".join(f"{a}{v}" for a, v in zip(keys, vals))
    return f"get {keys[k]} {table} = ", vals[k]


PRETRAIN_OPS = {
    "cpy": _pt_cpy, "nxt": _pt_nxt, "srt": _pt_srt, "cnt": _pt_cnt, "len": _pt_len, "fst": _pt_fst,
    "lst": _pt_lst, "rot": _pt_rot, "del": _pt_del, "dbl": _pt_dbl, "evn": _pt_evn, "unq": _pt_unq,
    "inc": _pt_inc, "dec": _pt_dec, "max": _pt_max, "get": _pt_get,
}
assert not set(PRETRAIN_OPS) & set(TASKS)


def pretrain_example(rng: random.Random) -> dict[str, str]:
    op = rng.choice(sorted(PRETRAIN_OPS))
    prompt, answer = PRETRAIN_OPS[op](rng)
    return {"prompt": prompt, "answer": answer}


class FinetuneSampler:
    """Training examples of one benchmark task, never a held-out one."""

    def __init__(self, task: str, rng: random.Random):
        self.task, self.rng = task, rng
        held = heldout_examples()[task]
        self.excluded = {ex["prompt"] for exs in held.values() for ex in exs}

    def __call__(self) -> dict[str, str]:
        while True:
            if self.task == "add":
                ex = add_example(self.rng.randint(0, ADD_MAX), self.rng.randint(0, ADD_MAX))
            else:
                ex = rev_example(_word(self.rng, REV_MIN_LEN, REV_MAX_LEN))
            if ex["prompt"] not in self.excluded:
                return ex


# --------------------------------------------------------------------------- #
# Tokenizer and model
# --------------------------------------------------------------------------- #

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list(DIGITS + LETTERS + " =\n")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_LEN = 64


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=MAX_LEN)


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 192
    num_attention_heads: int = 3  # head_dim 64 (vLLM's CPU attention rejects smaller heads)
    num_hidden_layers: int = 4
    intermediate_size: int = 384


def build_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_attention_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads, max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float  # peak; linear warmup then cosine decay to 0
    batch_size: int
    warmup: int
    prompt_loss: bool  # pretraining: loss on every token; fine-tuning: on the answer only


PRETRAIN = Schedule(steps=1500, lr=2e-3, batch_size=64, warmup=100, prompt_loss=True)
FINETUNE = Schedule(steps=1200, lr=1e-3, batch_size=32, warmup=30, prompt_loss=False)


def _char_id(c: str) -> int:
    return CHARS.index(c) + len(SPECIAL_TOKENS)


def encode(ex: dict[str, str], prompt_loss: bool) -> tuple[list[int], list[int]]:
    prompt = [BOS_ID] + [_char_id(c) for c in ex["prompt"]]
    answer = [_char_id(c) for c in ex["answer"]] + [EOS_ID]
    ids = prompt + answer
    return ids, (list(ids) if prompt_loss else [-100] * len(prompt) + answer)


def make_batch(sample, n: int, prompt_loss: bool):
    """Right-padded (ids, labels) of ``n`` examples from ``sample()``."""
    rows = [encode(sample(), prompt_loss) for _ in range(n)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        ids[i, :len(r_ids)] = torch.tensor(r_ids)
        labels[i, :len(r_labels)] = torch.tensor(r_labels)
    return ids, labels


def train(model, sched: Schedule, sample, seed: int, name: str, log=print) -> None:
    """Train in place on batches from ``sample()``.  Right padding only: padded positions follow every real
    token and carry no loss, so no attention mask is needed."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < sched.warmup:
            return sched.lr * (step + 1) / sched.warmup
        progress = (step - sched.warmup) / max(1, sched.steps - sched.warmup)
        return sched.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    model.train()
    t0 = time.time()
    for step in range(sched.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = make_batch(sample, sched.batch_size, sched.prompt_loss)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == sched.steps - 1:
            log(f"  [{name}] step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()


def greedy_accuracy(model, examples: list[dict[str, str]], max_new_tokens: int = 8) -> float:
    """Exact match of greedy completions (plain torch; the benchmark itself scores with lm-eval).  Prompts
    are grouped by length, so no padding is needed."""
    by_len: dict[int, list[tuple[list[int], str]]] = {}
    for ex in examples:
        ids = [BOS_ID] + [_char_id(c) for c in ex["prompt"]]
        by_len.setdefault(len(ids), []).append((ids, ex["answer"]))
    correct = 0
    with torch.no_grad():
        for rows in by_len.values():
            x = torch.tensor([ids for ids, _ in rows])
            out: list[list[int]] = [[] for _ in rows]
            done = [False] * len(rows)
            for _ in range(max_new_tokens):
                nxt = model(input_ids=x).logits[:, -1].argmax(-1)
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        if t == EOS_ID:
                            done[i] = True
                        else:
                            out[i].append(t)
                if all(done):
                    break
                x = torch.cat([x, nxt[:, None]], dim=1)
            for (_, answer), toks in zip(rows, out):
                text = "".join(CHARS[t - len(SPECIAL_TOKENS)] for t in toks if t >= len(SPECIAL_TOKENS))
                correct += int(text == answer)
    return correct / len(examples)


def quick_scores(model, split: str = "search") -> dict[str, float]:
    held = heldout_examples()
    return {task: greedy_accuracy(model, held[task][split]) for task in TASKS}


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #


def default_out() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_OUT)


def is_complete(out: Path, seed: int | None = None) -> bool:
    try:
        meta = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("recipe_version") != RECIPE_VERSION or (seed is not None and meta.get("seed") != seed):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((out / name / f).is_file() for name in MODEL_NAMES for f in needed)


def _reusable_base(out: Path, seed: int, shape: ModelShape) -> bool:
    try:
        meta = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("base_version") == BASE_VERSION and meta.get("seed") == seed
            and meta.get("shape") == asdict(shape) and meta.get("pretrain") == asdict(PRETRAIN)
            and (out / "base" / "model.safetensors").is_file())


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"  # a class name every transformers version knows
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def build(out: Path, seed: int, shape: ModelShape = ModelShape(), threads: int = 1, log=print) -> dict:
    """Train the three models into a temporary directory renamed to ``out``; return the manifest."""
    from transformers import LlamaForCausalLM

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    t_start = time.time()
    try:
        tokenizer = build_tokenizer()
        timings: dict[str, float] = {}
        if _reusable_base(out, seed, shape):
            log(f"keeping the base of {out} (same base recipe and seed)")
            model = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
            timings["pretrain"] = json.loads((out / MANIFEST).read_text())["timings_s"]["pretrain"]
        else:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(build_config(shape)).float()
            t0 = time.time()
            rng = random.Random(seed)
            train(model, PRETRAIN, lambda: pretrain_example(rng), seed, "pretrain", log)
            timings["pretrain"] = time.time() - t0
        model.eval()
        base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _save(model, tokenizer, tmp / "base")
        scores = {"base": quick_scores(model)}
        for i, (name, task) in enumerate(zip(FINETUNES, TASKS)):
            model.load_state_dict(base_sd)
            t0 = time.time()
            train(model, FINETUNE, FinetuneSampler(task, random.Random(seed + 1 + i)), seed + 1 + i, name, log)
            timings[name] = time.time() - t0
            _save(model, tokenizer, tmp / name)
            scores[name] = quick_scores(model)
        timings["total"] = time.time() - t_start
        manifest = {
            "recipe_version": RECIPE_VERSION, "base_version": BASE_VERSION, "seed": seed, "shape": asdict(shape),
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain": asdict(PRETRAIN), "finetune": asdict(FINETUNE), "pretrain_ops": sorted(PRETRAIN_OPS),
            "quick_scores_search_split": scores, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__, "threads": threads,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / ".gitignore").write_text("*\n")
        if out.exists():
            if is_complete(out, seed):  # a concurrent build finished first
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
    finally:
        torch.set_num_threads(prev_threads)


def ensure_bench_models(out: Path | str | None = None, seed: int = 0, force: bool = False, threads: int = 1,
                        log=print) -> Path:
    """Build the benchmark models into ``out`` (default ``$RAY_MERGE_BENCH_MODELS`` or bench_models/) unless
    a complete build of this recipe and seed is there."""
    out = Path(out if out is not None else default_out()).resolve()
    if not force and is_complete(out, seed):
        log(f"benchmark models already complete in {out}")
        return out
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no {MANIFEST}: refusing to replace it")
    build(out, seed, threads=threads, log=log)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default: ${ENV_VAR} or bench_models/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the weights depend on it)")
    p.add_argument("--write-task-data", action="store_true", help="only (re)write the held-out JSONL files")
    args = p.parse_args(argv)
    if args.write_task_data:
        for path in write_task_data():
            print(path)
        return 0
    out = ensure_bench_models(args.out, args.seed, args.force, threads=args.threads)
    meta = json.loads((out / MANIFEST).read_text())
    print(f"models in {out}")
    print(json.dumps(meta["quick_scores_search_split"]), "timings (s):", meta["timings_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
