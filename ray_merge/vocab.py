"""Vocabularies: the output tokenizer, and embedding rows remapped to it while streaming.

A recipe with a ``tokenizer`` block (or the legacy ``tokenizer_source``) merges models
whose tokenizers differ. At plan time we build the output tokenizer (``union`` of every
input's vocabulary, the ``base`` model's, or a named model's; plus any tokens the
``tokens`` overrides add) and, for every input model, where each output token lives in
that model's embedding (its *permutation*; -1 where the model lacks the token).

Every tensor on the vocabulary axis (``embed_tokens``, ``lm_head``, ``wte``, ...) then
gets a :class:`RowRemap`: for each input model and each output row, which row of that
model to use. A model that lacks a token (or whose row is overridden with
``force: true``) sees a *default* row instead, chosen as mergekit does:

* a ``tokens`` override: another model's row of that token (``source: MODEL``), a
  given row of a model (``source: {kind: model_token, model, token | token_id}``), or
  zeros (``source: {kind: zero}``);
* otherwise the only model that has the token gives its row; else the base model's row
  when the base has it; else the mean of the rows of the models that have it; zeros
  when no model has it.

Rows added by ``pad_to_multiple_of`` take each model's mean row over the vocabulary.
The merge method then runs on these aligned per-model tensors, so every method works
across vocabularies.

Memory: only the rows an output chunk needs are read (``pread`` of row ranges, never the
whole tensor), and for methods whose output rows depend only on the same input rows
(``row_splittable``) the merged tensor is computed and written chunk by chunk, the chunk
size set by ``--memory-budget``. Other methods need whole tensors; for them the remapped
per-model tensors are assembled chunk by chunk (the originals are never loaded whole).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ray_merge.errors import UserError

log = logging.getLogger("ray_merge")

# Names of tensors whose first axis is the vocabulary (input embeddings and output heads).
VOCAB_TENSOR_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "tok_embeddings", "embed_out")

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}

# default-row kinds of a RowRemap
NONE, ZERO, COPY, MEAN = -1, 0, 1, 2

MIN_CHUNK_ROWS = 64
DEFAULT_CHUNK_BUDGET = 512 * 2**20  # bytes, when the caller gives no memory budget
READ_GAP_ROWS = 8  # rows this close together are read in one range


# ---------------------------------------------------------------------------
# Recipe settings
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenOverride:
    """One entry of ``tokenizer.tokens``."""

    token: str
    kind: Optional[str]  # "model", "model_token", "zero"; None: the default rules
    model: Optional[str] = None  # a model reference as written in the recipe
    src_token: Optional[str] = None
    src_token_id: Optional[int] = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    source: str  # "union", "base" or a model reference
    tokens: tuple[TokenOverride, ...] = ()
    pad_to_multiple_of: Optional[int] = None
    key: str = "tokenizer"  # where it came from, for messages


def _same_model(a: str, b: str) -> bool:
    from ray_merge.recipe import ModelRef

    ra, rb = ModelRef.parse(a), ModelRef.parse(b)
    if ra == rb:
        return True
    norm = lambda p: os.path.normpath(os.path.abspath(os.path.expanduser(p)))  # noqa: E731
    return ra.revision == rb.revision and norm(ra.path) == norm(rb.path)


def parse_tokenizer_settings(recipe, err: Optional[Callable[[str, str], Exception]] = None
                             ) -> Optional[TokenizerSettings]:
    """Validate ``tokenizer`` / ``tokenizer_source`` of a recipe; None when neither is set.

    ``err(key, message)`` builds the exception (recipe.py passes its own); every model a
    token override names must be one of the recipe's models.
    """
    if err is None:
        err = lambda key, msg: UserError(msg, source=recipe.source, key=key)  # noqa: E731
    legacy, block = recipe.tokenizer_source, recipe.tokenizer
    if legacy is None and block is None:
        return None
    if legacy is not None and block is not None:
        raise err("tokenizer", "give either 'tokenizer' or 'tokenizer_source', not both")
    if legacy is not None:
        if not isinstance(legacy, str) or not legacy.strip():
            raise err("tokenizer_source", "must be 'union', 'base' or a model reference")
        return TokenizerSettings(source=legacy.strip(), key="tokenizer_source")
    if not isinstance(block, dict):
        raise err("tokenizer", "must be a mapping (source, tokens, pad_to_multiple_of)")
    extra = sorted(set(block) - TOKENIZER_KEYS)
    if extra:
        raise err(f"tokenizer.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(TOKENIZER_KEYS))})")
    source = block.get("source")
    if source is None:
        source = "union"
    if not isinstance(source, str) or not source.strip():
        raise err("tokenizer.source", "must be 'union', 'base' or a model reference")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise err("tokenizer.pad_to_multiple_of", f"must be a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise err("tokenizer.tokens", "must be a mapping of token strings to {source, force}")
    models = [str(m) for m in recipe.referenced_models()]
    overrides = []
    for tok, entry in tokens.items():
        key = f"tokenizer.tokens.{tok}"
        if not isinstance(tok, str) or not tok:
            raise err(key, "token must be a non-empty string")
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise err(key, "must be a mapping with 'source' and/or 'force'")
        extra = sorted(set(entry) - TOKEN_KEYS)
        if extra:
            raise err(f"{key}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(TOKEN_KEYS))})")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise err(f"{key}.force", "must be true or false")
        src = entry.get("source")
        skey = f"{key}.source"

        def member(ref: Any, k: str) -> str:
            if not isinstance(ref, str) or not ref.strip():
                raise err(k, "must be a model reference")
            if not any(_same_model(ref, m) for m in models):
                raise err(k, f"model {ref} is not one of the recipe's models ({', '.join(models)})")
            return ref

        if src is None:
            overrides.append(TokenOverride(tok, None, force=force))
        elif isinstance(src, str):
            overrides.append(TokenOverride(tok, "model", model=member(src, skey), force=force))
        elif isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero":
                extra = sorted(set(src) - {"kind"})
                if extra:
                    raise err(f"{skey}.{extra[0]}", "a zero embedding takes no other keys")
                overrides.append(TokenOverride(tok, "zero", force=force))
            elif kind == "model_token":
                extra = sorted(set(src) - {"kind", "model", "token", "token_id"})
                if extra:
                    raise err(f"{skey}.{extra[0]}", "unknown key (allowed: kind, model, token, token_id)")
                model = member(src.get("model"), f"{skey}.model")
                has_tok, has_id = src.get("token") is not None, src.get("token_id") is not None
                if has_tok == has_id:
                    raise err(skey, "a model_token source needs exactly one of 'token' or 'token_id'")
                tid = src.get("token_id")
                if has_id and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                    raise err(f"{skey}.token_id", f"must be a non-negative integer, got {tid!r}")
                if has_tok and not isinstance(src["token"], str):
                    raise err(f"{skey}.token", "must be a string")
                overrides.append(TokenOverride(tok, "model_token", model=model, src_token=src.get("token"),
                                               src_token_id=tid, force=force))
            else:
                raise err(f"{skey}.kind", f"must be 'model_token' or 'zero', got {kind!r}")
        else:
            raise err(skey, "must be a model reference or a mapping with 'kind'")
    return TokenizerSettings(source=source.strip(), tokens=tuple(overrides), pad_to_multiple_of=pad)


def check_recipe(recipe, err: Callable[[str, str], Exception]) -> None:
    """Recipe-load checks of the tokenizer settings and the chat template (no model is read)."""
    from ray_merge.chat_template import check_chat_template

    parse_tokenizer_settings(recipe, err)
    check_chat_template(recipe.chat_template, err)


# ---------------------------------------------------------------------------
# Config helpers
# ---------------------------------------------------------------------------

def config_vocab_size(config: dict) -> Optional[int]:
    v = config.get("vocab_size")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None


def set_config_vocab_size(config: dict, n: int) -> None:
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict) \
            and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = n
    else:
        config["vocab_size"] = n


def is_vocab_tensor_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in VOCAB_TENSOR_NAMES and parts[-1] == "weight"


def shape_mismatch_hint(name: str) -> str:
    if is_vocab_tensor_name(name):
        return ("; the vocabularies differ: set 'tokenizer: {source: union}' (or base, or a model) "
                "to merge them")
    return ""


# ---------------------------------------------------------------------------
# Tokenizers (plan time)
# ---------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def _load_tokenizer(path: str, label: str, required: bool, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, bad JSON, unknown classes
        if required:
            raise UserError(f"model {label}: cannot load its tokenizer ({type(e).__name__}: {_one_line(e)})")
        log.warning("model %s: cannot load its tokenizer (%s); assuming the base model's", label, _one_line(e))
        return None


def _save(tok, out_dir: str) -> None:
    tok.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):  # loading kwargs transformers echoes back; not part of the tokenizer
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if any(k in cfg for k in ("is_local", "local_files_only")):
            cfg.pop("is_local", None)
            cfg.pop("local_files_only", None)
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
                f.write("\n")


def _reload(tok, trust_remote_code: bool = False):
    """A fresh copy of a tokenizer (save and load), so changes never touch the original."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ray-merge-tok-") as d:
        _save(tok, d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)


def _strip_tokenizer(tok, vocab_size: int, label: str):
    """The tokenizer without the tokens whose ids are >= the model's vocab_size (no embedding row)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    drop = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not drop:
        return tok
    if not getattr(tok, "is_fast", False):
        raise UserError(f"model {label}: its tokenizer has {len(drop)} tokens past vocab_size={vocab_size} "
                        "and is not a fast tokenizer, so they cannot be removed for a tokenizer merge")
    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [a for a in data.get("added_tokens", []) if a["id"] < vocab_size]
    model = data["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        model["vocab"] = {t: i for t, i in vocab.items() if i < vocab_size}
    elif isinstance(vocab, list):  # unigram: position is the id
        model["vocab"] = vocab[:vocab_size]
    if isinstance(model.get("merges"), list):
        def keep(m):
            parts = m.split(" ") if isinstance(m, str) else list(m)
            return not any(p in drop for p in parts)

        model["merges"] = [m for m in model["merges"] if keep(m)]
    stripped = Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory(prefix="ray-merge-tok-") as d:
        _save(tok, d)
        stripped.save(os.path.join(d, "tokenizer.json"))
        cfg_path = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            dec = cfg.get("added_tokens_decoder")
            if isinstance(dec, dict):
                cfg["added_tokens_decoder"] = {k: v for k, v in dec.items() if int(k) < vocab_size}
            for key in ("extra_special_tokens", "additional_special_tokens"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = [t for t in cfg[key] if (t if isinstance(t, str) else t.get("content")) not in drop]
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
        out = AutoTokenizer.from_pretrained(d)
    log.info("model %s: %d tokenizer entries past vocab_size=%d ignored", label, len(drop), vocab_size)
    return out


@dataclass
class _Resolved:
    """A token override resolved against the output vocabulary and the plan's models."""

    out_id: int
    token: str
    kind: Optional[str]
    model: Optional[int]  # plan model index
    row: Optional[int]  # model_token: the row in that model
    force: bool
    key: str


@dataclass
class TokenizerPlan:
    """What the output directory gets: tokenizer files and/or a chat template (picklable, light)."""

    source: Optional[str]  # None: no tokenizer settings (the donor's tokenizer is copied)
    files: Optional[dict[str, bytes]] = None  # the built tokenizer, relative path -> bytes
    chat_template: Optional[str] = None
    n_vocab: int = 0  # tokens of the output vocabulary
    out_rows: int = 0  # rows of the output embeddings (n_vocab padded)
    added: list[str] = field(default_factory=list)  # tokens the output has that the base lacks

    def write(self, stage: str, donor_dir: str, copy_tokenizer: bool) -> None:
        from ray_merge.chat_template import write_chat_template
        from ray_merge.output import TOKENIZER_FILES

        if self.files is not None:
            for rel, data in sorted(self.files.items()):
                path = os.path.join(stage, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            return
        if not copy_tokenizer:
            if self.chat_template:
                log.warning("chat_template given but --no-copy-tokenizer: no tokenizer, so no template, written")
            return
        copied = False
        for name in TOKENIZER_FILES:
            src = os.path.join(donor_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(stage, name))
                copied = True
        if self.chat_template:
            if copied:
                write_chat_template(stage, self.chat_template)
            else:
                log.warning("chat_template given but the donor model has no tokenizer files; template not written")


def tokenizer_writer(plan, copy_tokenizer: bool) -> Optional[Callable[[str], None]]:
    """finalize()'s tokenizer_writer for a plan, or None to copy the donor's tokenizer as usual."""
    tp = getattr(plan, "tokenizer", None)
    if tp is None or (tp.files is None and not tp.chat_template):
        return None
    donor_dir = plan.models[plan.donor].path
    return lambda stage: tp.write(stage, donor_dir, copy_tokenizer)


def vocab_planner(recipe, models: list[tuple[str, str, dict]], donor: int) -> Optional["VocabPlanner"]:
    """The planner's vocabulary state, or None when the recipe sets no tokenizer nor chat template."""
    if recipe.tokenizer is None and recipe.tokenizer_source is None and not recipe.chat_template:
        return None
    return VocabPlanner(recipe, models, donor)


class VocabPlanner:
    """Plan-time state: the output vocabulary and every model's permutation into it.

    Built by the planner (plan.py) before tensors are planned; ``attach`` gives each
    vocabulary tensor its RowRemap. Only the light ``plan`` (a TokenizerPlan) goes into
    the Plan.
    """

    def __init__(self, recipe, models: list[tuple[str, str, dict]], donor: int, trust_remote_code: bool = False):
        """``models``: (reference, local directory, config) of every plan model, in plan order."""
        from ray_merge.chat_template import resolve_chat_template

        self.recipe = recipe
        self.models = models
        self.donor = donor
        self.settings = parse_tokenizer_settings(recipe)
        template = resolve_chat_template(recipe.chat_template, [m[1] for m in models])
        self.perms: dict[int, torch.Tensor] = {}
        self.overrides: list[_Resolved] = []
        self.plan = TokenizerPlan(source=None, chat_template=template)
        if self.settings is not None:
            self._build(trust_remote_code)

    @property
    def remaps(self) -> bool:
        return self.settings is not None

    def _err(self, key: str, msg: str) -> UserError:
        return UserError(msg, source=self.recipe.source, key=key)

    def _vocab_size(self, i: int, tok) -> int:
        return config_vocab_size(self.models[i][2]) or len(tok.get_vocab())

    def _build(self, trust_remote_code: bool) -> None:
        from ray_merge.io.models import resolve_model_dir
        from ray_merge.recipe import ModelRef

        s = self.settings
        base_i = self.donor
        base_ref, base_dir, _ = self.models[base_i]
        base_raw = _load_tokenizer(base_dir, base_ref, True, trust_remote_code)
        base_tok = _strip_tokenizer(base_raw, self._vocab_size(base_i, base_raw), base_ref)
        toks: dict[int, Any] = {base_i: base_tok}
        for i, (ref, path, _) in enumerate(self.models):
            if i != base_i:
                t = _load_tokenizer(path, ref, False, trust_remote_code)
                if t is not None:
                    toks[i] = t

        source = s.source
        if source == "base":
            out = _reload(base_tok, trust_remote_code)
        elif source == "union":
            out = self._union(base_tok, toks, trust_remote_code)
        else:
            idx = next((i for i, m in enumerate(self.models) if _same_model(source, m[0])), None)
            if idx is not None:
                path = self.models[idx][1]
            else:
                path = resolve_model_dir(ModelRef.parse(source), weights=False)
            out = _reload(_load_tokenizer(path, source, True, trust_remote_code), trust_remote_code)
        have = set(out.get_vocab())
        for ov in s.tokens:  # tokens the overrides name are added when missing
            if ov.token not in have:
                out.add_tokens(ov.token)
                have.add(ov.token)
        if self.plan.chat_template:
            out.chat_template = self.plan.chat_template

        from transformers import AutoTokenizer

        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(prefix="ray-merge-tok-") as d:
            _save(out, d)
            for root, _, names in os.walk(d):
                for n in names:
                    p = os.path.join(root, n)
                    with open(p, "rb") as f:
                        files[os.path.relpath(p, d)] = f.read()
            final = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
        vocab = final.get_vocab()
        n_vocab = max(len(vocab), max(vocab.values(), default=-1) + 1)
        out_rows = n_vocab
        if s.pad_to_multiple_of and out_rows % s.pad_to_multiple_of:
            out_rows += s.pad_to_multiple_of - out_rows % s.pad_to_multiple_of
        base_vocab = base_tok.get_vocab()
        self.plan.source = source
        self.plan.files = files
        self.plan.n_vocab = n_vocab
        self.plan.out_rows = out_rows
        self.plan.added = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in base_vocab]

        # permutations: each model's row of each output token (-1: absent)
        originals: dict[int, dict[str, int]] = {}
        tokens_by_id = [None] * n_vocab
        for t, i in vocab.items():
            tokens_by_id[i] = t
        for i in range(len(self.models)):
            tok = toks.get(i, base_tok)
            mv = tok.get_vocab()
            originals[i] = mv
            vs = config_vocab_size(self.models[i][2]) or len(mv)
            perm = [-1] * n_vocab
            for out_id, t in enumerate(tokens_by_id):
                j = mv.get(t) if t is not None else None
                if j is not None and j < vs:
                    perm[out_id] = j
            self.perms[i] = torch.tensor(perm, dtype=torch.int32)

        # token overrides, checked against the models now (before any tensor is read)
        for ov in s.tokens:
            key = f"tokenizer.tokens.{ov.token}.source"
            model = None
            if ov.model is not None:
                model = next(i for i, m in enumerate(self.models) if _same_model(ov.model, m[0]))
            row = None
            out_id = vocab[ov.token]
            if ov.kind == "model" and int(self.perms[model][out_id]) < 0:
                raise self._err(key, f"token {ov.token!r} is not in the vocabulary of model {ov.model}")
            if ov.kind == "model_token":
                if ov.src_token is not None:
                    if model not in toks:
                        raise self._err(key, f"model {ov.model} has no loadable tokenizer to look up "
                                             f"token {ov.src_token!r}")
                    row = originals[model].get(ov.src_token)
                    if row is None:
                        raise self._err(f"{key}.token", f"token {ov.src_token!r} is not in the vocabulary of "
                                                        f"model {ov.model}")
                else:
                    row = ov.src_token_id
            self.overrides.append(_Resolved(out_id, ov.token, ov.kind, model, row, ov.force, key))

    def _union(self, base_tok, toks: dict[int, Any], trust_remote_code: bool):
        """The base tokenizer plus every token another model has, in model order then id order."""
        out = _reload(base_tok, trust_remote_code)
        base_vocab = base_tok.get_vocab()
        seen = set(base_vocab)
        regular: list[str] = []
        added: dict[str, Any] = {}
        order = [self.donor] + [i for i in range(len(self.models)) if i != self.donor and i in toks]
        for i in order:
            tok = toks[i]
            vs = self._vocab_size(i, tok)
            decoder = tok.added_tokens_decoder
            contents = {a.content for a in decoder.values()}
            for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
                if idx < vs and t not in contents and t not in seen:
                    seen.add(t)
                    regular.append(t)
            for idx in sorted(decoder):
                if idx >= vs:
                    continue
                a = decoder[idx]
                if a.content in added:
                    if str(added[a.content]) != str(a):
                        log.warning("token %r is added with different settings by different models; "
                                    "using the first", a.content)
                    continue
                added[a.content] = a
        for t in regular:
            if t not in added:
                out.add_tokens(t)
        for a in added.values():
            out.add_tokens(a)
        return out

    # -- tensors ------------------------------------------------------------
    def is_vocab_tensor(self, name: str, shapes) -> bool:
        return self.remaps and is_vocab_tensor_name(name) and all(len(s) >= 1 for s in shapes)

    def check_shapes(self, name: str, metas) -> None:
        rest = {tuple(tm.shape[1:]) for _, _, tm in metas}
        if len(rest) > 1:
            desc = ", ".join(f"{ref}: {list(tm.shape)}" for ref, _, tm in metas)
            raise UserError(f"tensor {name}: embedding widths differ across models ({desc})",
                            source=self.recipe.source)

    def attach(self, pt, method) -> None:
        """Give a planned vocabulary tensor its RowRemap, output shape and working memory."""
        n_in = len(pt.inputs)
        V = self.plan.n_vocab
        P = torch.stack([self.perms[i.model] for i in pt.inputs]).to(torch.int64)
        for k, inp in enumerate(pt.inputs):
            P[k][P[k] >= inp.shape[0]] = -1
        has = P >= 0
        num = has.sum(0)
        first = has.to(torch.int8).argmax(0)
        kind = torch.full((V,), MEAN, dtype=torch.int8)
        def_input = first.to(torch.int16)
        def_row = P.gather(0, first.unsqueeze(0)).squeeze(0)
        kind[num == 1] = COPY
        kind[num == 0] = ZERO
        b = pt.base_index
        if b is not None:
            from_base = (num >= 2) & has[b]
            kind[from_base] = COPY
            def_input[from_base] = b
            def_row[from_base] = P[b][from_base]
        force = torch.zeros(V, dtype=torch.bool)
        for ov in self.overrides:
            r = ov.out_id
            force[r] = ov.force
            if ov.kind is None:
                continue
            if ov.kind == "zero":
                kind[r] = ZERO
                continue
            j = next((k for k, inp in enumerate(pt.inputs) if inp.model == ov.model), None)
            if j is None:
                raise UserError(f"token {ov.token!r} takes its embedding from model {self.models[ov.model][0]}, "
                                f"which has no tensor for {pt.name}", source=self.recipe.source, key=ov.key)
            row = int(P[j, r]) if ov.kind == "model" else ov.row
            if ov.kind == "model" and row < 0:
                raise UserError(f"token {ov.token!r} has no row in {pt.name} of model {self.models[ov.model][0]}",
                                source=self.recipe.source, key=ov.key)
            if row >= pt.inputs[j].shape[0]:
                raise UserError(f"token id {row} is out of range for {pt.name} of model "
                                f"{self.models[ov.model][0]} ({pt.inputs[j].shape[0]} rows)",
                                source=self.recipe.source, key=ov.key)
            kind[r] = COPY
            def_input[r] = j
            def_row[r] = row
        need = force | (~has).any(0)
        kind[~need] = NONE

        in_dtypes = [getattr(torch, i.dtype) for i in pt.inputs]
        comp = pt.compute_dtype
        if comp is None:
            d = in_dtypes[0]
            for x in in_dtypes[1:]:
                d = torch.promote_types(d, x)
            comp = str(d).removeprefix("torch.")
        rest = tuple(pt.inputs[0].shape[1:])
        width = 1
        for d in rest:
            width *= d
        comp_sz = getattr(torch, comp).itemsize
        in_sz = max(d.itemsize for d in in_dtypes)
        out_sz = getattr(torch, pt.out_dtype).itemsize
        ws = method.extra.get("workspace_tensors", 2) if method is not None else 2
        # per output row: fetched rows (up to 2 per model), per-model rows, one read range,
        # float32 mean accumulator, method temporaries, the output (and its write copy)
        per_row = width * (3 * n_in * comp_sz + in_sz + 4 + ws * comp_sz + 2 * out_sz)
        chunked = bool(method is not None and method.row_splittable and not method.randomized)
        out_rows = self.plan.out_rows
        whole = out_rows * width * (comp_sz * (n_in + ws) + out_sz)
        rm = RowRemap(
            n_vocab=V, out_rows=out_rows, perm=P.to(torch.int32), force=force, kind=kind, def_input=def_input,
            def_row=def_row.to(torch.int32), chunked=chunked, compute_dtype=comp, rest=rest,
            per_row_bytes=per_row, whole_bytes=0 if chunked else whole,
        )
        pt.row_remap = rm
        pt.shape = (out_rows, *rest)
        # as for any tensor: the working set of merging it at once (executor.row_bytes() divides
        # it by the rows); a chunked remap never needs more than rows_per_chunk() rows of it
        pt.working_bytes = int(per_row * out_rows if chunked else whole + per_row * min(out_rows, MIN_CHUNK_ROWS))

    def update_config(self, config: dict) -> None:
        if self.remaps:
            set_config_vocab_size(config, self.plan.out_rows)


# ---------------------------------------------------------------------------
# Row remaps (execution)
# ---------------------------------------------------------------------------

@dataclass
class RowRemap:
    """How to build each input model's rows of one vocabulary tensor (see the module doc)."""

    n_vocab: int
    out_rows: int
    perm: torch.Tensor  # int32 [inputs, n_vocab]: the input's own row of each token, -1 if absent
    force: torch.Tensor  # bool [n_vocab]: every input uses the default row
    kind: torch.Tensor  # int8 [n_vocab]: NONE (no default needed), ZERO, COPY, MEAN
    def_input: torch.Tensor  # int16 [n_vocab]: COPY: which input
    def_row: torch.Tensor  # int32 [n_vocab]: COPY: which row of it
    chunked: bool  # the method is row-splittable: merge and write chunk by chunk
    compute_dtype: str
    rest: tuple  # the non-vocabulary dimensions
    per_row_bytes: int
    whole_bytes: int  # not chunked: the whole per-model tensors + method + output

    def rows_per_chunk(self, memory_budget: Optional[int]) -> int:
        budget = (memory_budget or DEFAULT_CHUNK_BUDGET) - self.whole_bytes
        least = 1 if self.chunked else MIN_CHUNK_ROWS  # whole tensors dwarf a few rows anyway
        return int(min(max(self.out_rows, 1), max(least, budget // max(self.per_row_bytes, 1))))


class _InputRows:
    """Reads row ranges of one input tensor: ``pread`` for safetensors (only those bytes
    are read; no memory map keeps pages of the whole tensor resident), else the loader."""

    def __init__(self, loader, inp):
        from ray_merge.executor import TensorLoader

        self.loader, self.inp = loader, inp
        self._fh = None
        plain = type(loader).load is TensorLoader.load
        if plain and inp.file.endswith(".safetensors"):
            from ray_merge.io.models import SAFETENSORS_DTYPES

            fh = open(inp.file, "rb")
            try:
                n = int.from_bytes(fh.read(8), "little")
                info = json.loads(fh.read(n))[inp.tensor]
                self.dtype = SAFETENSORS_DTYPES[info["dtype"]]
                self.shape = tuple(info["shape"])
                width = 1
                for d in self.shape[1:]:
                    width *= d
                self.row_bytes = width * self.dtype.itemsize
                self.offset = 8 + n + info["data_offsets"][0]
                self._fh = fh
            except Exception:
                fh.close()
                raise
        self._plain = plain

    def read(self, lo: int, hi: int) -> torch.Tensor:
        if self._fh is not None:
            nbytes = (hi - lo) * self.row_bytes
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._fh.seek(self.offset + lo * self.row_bytes)
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:
                k = self._fh.readinto(view[got:])
                if not k:
                    raise OSError(f"{self.inp.file}: short read of {self.inp.tensor}")
                got += k
            return buf.view(self.dtype).view(hi - lo, *self.shape[1:])
        if self._plain and hasattr(self.loader, "reader"):
            return self.loader.reader(self.inp.model).read_rows(self.inp.tensor, lo, hi)
        return self.loader.load(self.inp)[lo:hi]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RemappedRows:
    """One vocabulary tensor, merged from remapped per-model rows, produced in row chunks.

    ``chunks()`` yields (first row, merged rows) in order; ``materialize()`` the whole
    tensor; ``write_to(writer)`` streams it into a ShardWriter.
    """

    def __init__(self, pt, loader, *, seed: Optional[int], device: str = "cpu",
                 memory_budget: Optional[int] = None, rows: Optional[int] = None):
        self.pt, self.loader, self.seed, self.device = pt, loader, seed, device
        self.rm: RowRemap = pt.row_remap
        self.comp = getattr(torch, self.rm.compute_dtype)
        self.rows = max(1, rows) if rows else self.rm.rows_per_chunk(memory_budget)
        self.chunk_count = 0
        self._sums: Optional[list[torch.Tensor]] = None

    # -- reading ---------------------------------------------------------
    def _fetch(self, reader: _InputRows, rows: torch.Tensor) -> torch.Tensor:
        """Rows (sorted, unique) of one input, in compute dtype, reading nearby rows together."""
        n = rows.numel()
        out = torch.empty((n, *self.rm.rest), dtype=self.comp)
        r = rows.tolist()
        max_span = max(self.rows, MIN_CHUNK_ROWS)
        start = 0
        while start < n:
            lo = r[start]
            end = start + 1
            while end < n and r[end] - r[end - 1] <= READ_GAP_ROWS and r[end] - lo < max_span:
                end += 1
            hi = r[end - 1] + 1
            block = reader.read(lo, hi)
            if hi - lo == end - start:
                out[start:end] = block
            else:
                out[start:end] = block[rows[start:end] - lo]
            del block
            start = end
        return out

    def _per_model(self, readers: list[_InputRows], a: int, b: int) -> list[torch.Tensor]:
        """Each input's rows [a, b) of the output vocabulary, defaults filled in."""
        rm = self.rm
        n_in = rm.perm.shape[0]
        P = rm.perm[:, a:b].to(torch.int64)
        F = rm.force[a:b]
        K = rm.kind[a:b]
        DI = rm.def_input[a:b].to(torch.int64)
        DR = rm.def_row[a:b].to(torch.int64)
        own = (P >= 0) & ~F
        is_mean, is_copy = K == MEAN, K == COPY
        keys, fetched = [], []
        for j in range(n_in):
            want = torch.cat([P[j][own[j]], P[j][is_mean & (P[j] >= 0)], DR[is_copy & (DI == j)]])
            rows = torch.unique(want)  # sorted
            keys.append(rows)
            fetched.append(self._fetch(readers[j], rows))

        def take(j: int, rows: torch.Tensor) -> torch.Tensor:
            return fetched[j][torch.searchsorted(keys[j], rows)]

        n = b - a
        defaults = None
        if bool((K != NONE).any()):
            defaults = torch.zeros((n, *rm.rest), dtype=self.comp)
            for j in range(n_in):
                m = is_copy & (DI == j)
                if bool(m.any()):
                    defaults[m] = take(j, DR[m])
            if bool(is_mean.any()):
                idx = is_mean.nonzero().squeeze(1)
                acc = torch.zeros((idx.numel(), *rm.rest), dtype=torch.float32)
                cnt = torch.zeros(idx.numel(), dtype=torch.float32)
                for j in range(n_in):
                    pj = P[j][idx]
                    h = pj >= 0
                    if bool(h.any()):
                        acc[h] += take(j, pj[h]).float()
                        cnt += h
                acc /= cnt.clamp(min=1).view(-1, *([1] * len(rm.rest)))
                defaults[idx] = acc.to(self.comp)
                del acc
        outs = []
        for i in range(n_in):
            if defaults is None and bool(own[i].all()) and torch.equal(keys[i], P[i]):
                t = fetched[i]  # the model's own rows, in order: already the chunk
            else:
                t = defaults.clone() if defaults is not None else torch.zeros((n, *rm.rest), dtype=self.comp)
                o = own[i]
                if bool(o.any()):
                    t[o] = take(i, P[i][o])
            outs.append(t)
        del fetched, defaults
        if self._sums is not None:
            for i, t in enumerate(outs):
                self._sums[i] += t.sum(0, dtype=torch.float64)
        return outs

    def _padding(self, n: int) -> list[torch.Tensor]:
        """Rows past the vocabulary (pad_to_multiple_of): each model's mean row."""
        return [(s / self.rm.n_vocab).to(self.comp).expand(n, *self.rm.rest).clone() for s in self._sums]

    # -- output ----------------------------------------------------------
    def chunks(self):
        from ray_merge import executor

        rm, pt = self.rm, self.pt
        n_in = rm.perm.shape[0]
        pad = rm.out_rows - rm.n_vocab
        self._sums = [torch.zeros(rm.rest, dtype=torch.float64) for _ in range(n_in)] if pad > 0 else None
        readers = [_InputRows(self.loader, inp) for inp in pt.inputs]
        try:
            if rm.chunked:
                for a in range(0, rm.n_vocab, self.rows):
                    ins = self._per_model(readers, a, min(rm.n_vocab, a + self.rows))
                    out = executor.compute_tensor(pt, ins, self.seed, self.device)
                    del ins
                    self.chunk_count += 1
                    yield a, out
                for a in range(rm.n_vocab, rm.out_rows, self.rows):
                    ins = self._padding(min(rm.out_rows, a + self.rows) - a)
                    self.chunk_count += 1
                    yield a, executor.compute_tensor(pt, ins, self.seed, self.device)
                return
            whole = [torch.empty((rm.out_rows, *rm.rest), dtype=self.comp) for _ in range(n_in)]
            for a in range(0, rm.n_vocab, self.rows):
                b = min(rm.n_vocab, a + self.rows)
                for w, t in zip(whole, self._per_model(readers, a, b)):
                    w[a:b] = t
            if pad > 0:
                for w, t in zip(whole, self._padding(pad)):
                    w[rm.n_vocab:] = t
            self.chunk_count = 1
            out = executor.compute_tensor(pt, whole, self.seed, self.device)
            del whole
            yield 0, out
        finally:
            for r in readers:
                r.close()

    def materialize(self) -> torch.Tensor:
        out = None
        for a, t in self.chunks():
            if out is None:
                if a == 0 and t.shape[0] == self.rm.out_rows:
                    return t
                out = torch.empty((self.rm.out_rows, *t.shape[1:]), dtype=t.dtype)
            out[a:a + t.shape[0]] = t
        return out

    def write_to(self, writer) -> None:
        for a, t in self.chunks():
            writer.write_rows(self.pt.name, a, t)
