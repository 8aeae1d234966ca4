"""Vocabularies: the output tokenizer, and embedding rows remapped to it while streaming.

A recipe with a ``tokenizer`` block (or the legacy ``tokenizer_source``) merges models
whose tokenizers differ. At plan time we build the output tokenizer (``union`` of every
input's vocabulary, the ``base`` model's, or a named model's; plus any tokens the
``tokens`` overrides add) and, for every input model, where each output token lives in
that model's embedding (its *permutation*; -1 where the model lacks the token).

Every tensor on the vocabulary axis (``embed_tokens``, ``lm_head``, ``wte``, ..., weights and
1-D biases such as phi's ``lm_head.bias``) then
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

Without tokenizer settings, vocabularies of different sizes are an error, unless
``--unsafe-truncate-embeddings`` (mergekit's flag): then each vocabulary tensor keeps the
first rows every model has, ids taken as they are (:func:`truncated`), and the output
config's ``vocab_size`` says so. With tokenizer settings the flag has no effect.

Memory (ray_merge.execute.rows): only the rows an output chunk needs are read (row ranges
through ray_merge.io, never the whole tensor), and for methods whose output rows depend only on the same input rows
(``row_splittable``) the merged tensor is computed and written chunk by chunk, the chunk
size set by ``--memory-budget``. Other methods need whole tensors; for them the remapped
per-model tensors are assembled chunk by chunk (the originals are never loaded whole).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ray_merge.chat_template import resolve_chat_template
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef, resolve_model_dir
from ray_merge.io.tokenizers import TOKENIZER_FILES, _load_tokenizer, _reload, _save, _strip_tokenizer
from ray_merge.recipe.tokenizer import _same_model, parse_tokenizer_settings

log = logging.getLogger("ray_merge")


# Names of tensors whose first axis is the vocabulary (input embeddings and output heads).
VOCAB_TENSOR_NAMES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "tok_embeddings", "embed_out")


# default-row kinds of a RowRemap
NONE, ZERO, COPY, MEAN = -1, 0, 1, 2


MIN_CHUNK_ROWS = 64


DEFAULT_CHUNK_BUDGET = 512 * 2**20  # bytes, when the caller gives no memory budget


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
    """Embedding and output-head tensors, weights and biases (``lm_head.bias``): one row per token."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in VOCAB_TENSOR_NAMES and parts[-1] in ("weight", "bias")


def shape_mismatch_hint(name: str) -> str:
    if is_vocab_tensor_name(name):
        return ("; the vocabularies differ: set 'tokenizer: {source: union}' (or base, or a model) "
                "to merge them (or, if the ids agree, --unsafe-truncate-embeddings to keep the common rows)")
    return ""


def check_vocab_widths(name: str, metas, source) -> None:
    """Vocabulary tensors may differ in rows only: every other dimension must agree."""
    rest = {tuple(tm.shape[1:]) for _, _, tm in metas}
    if len(rest) > 1:
        desc = ", ".join(f"{ref}: {list(tm.shape)}" for ref, _, tm in metas)
        raise UserError(f"tensor {name}: embedding widths differ across models ({desc})", source=source)


def warn_if_no_tokenizer(ref: str, path: str) -> None:
    """The donor has no tokenizer files: the output gets none (mergekit logs an error and writes none)."""
    if not any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES):
        _warn_once(f"model {ref} (whose tokenizer the output takes) has no tokenizer files: the merged model is "
                   "written without a tokenizer (as mergekit does); copy one into it before use")


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


# ---------------------------------------------------------------------------
# Tokenizers (plan time)
# ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class TokenizerPlan:
    """What the output directory gets: tokenizer files and/or a chat template (picklable, light).

    ray_merge.output.tokenizer writes it.
    """

    source: Optional[str]  # None: no tokenizer settings (the donor's tokenizer is copied)
    files: Optional[dict[str, bytes]] = None  # the built tokenizer, relative path -> bytes
    chat_template: Optional[str] = None
    n_vocab: int = 0  # tokens of the output vocabulary
    out_rows: int = 0  # rows of the output embeddings (n_vocab padded)
    added: list[str] = field(default_factory=list)  # tokens the output has that the base lacks


def vocab_planner(recipe, models: list[tuple[str, str, dict]], donor: int,
                  trust_remote_code: bool = False) -> Optional["VocabPlanner"]:
    """The planner's vocabulary state, or None when the recipe sets no tokenizer nor chat template."""
    if recipe.tokenizer is None and recipe.tokenizer_source is None and not recipe.chat_template:
        return None
    return VocabPlanner(recipe, models, donor, trust_remote_code)


class VocabPlanner:
    """Plan-time state: the output vocabulary and every model's permutation into it.

    Built by the planner (plan.py) before tensors are planned; ``remapped`` gives each
    vocabulary tensor its RowRemap. Only the light ``plan`` (a TokenizerPlan) goes into
    the Plan.
    """

    def __init__(self, recipe, models: list[tuple[str, str, dict]], donor: int, trust_remote_code: bool = False):
        """``models``: (reference, local directory, config) of every plan model, in plan order."""

        self.recipe = recipe
        self.models = models
        self.donor = donor
        self.settings = parse_tokenizer_settings(recipe)
        template = resolve_chat_template(recipe.chat_template, [m[1] for m in models])
        self.perms: dict[int, torch.Tensor] = {}
        self.overrides: list[_Resolved] = []
        if self.settings is None:
            self.plan = TokenizerPlan(source=None, chat_template=template)
        else:
            self.plan = self._build(template, trust_remote_code)

    @property
    def remaps(self) -> bool:
        return self.settings is not None

    def _err(self, key: str, msg: str) -> UserError:
        return UserError(msg, source=self.recipe.source, key=key)

    def _vocab_size(self, i: int, tok) -> int:
        return config_vocab_size(self.models[i][2]) or len(tok.get_vocab())

    def _build(self, template: Optional[str], trust_remote_code: bool) -> TokenizerPlan:
        """The output tokenizer; fills in every model's permutation and the resolved overrides."""

        s = self.settings
        base_i = self.donor
        base_ref, base_dir, _ = self.models[base_i]
        if not any(os.path.exists(os.path.join(base_dir, n)) for n in TOKENIZER_FILES):
            raise self._err(s.key, f"model {base_ref} has no tokenizer files, and the output tokenizer is built on "
                                   "its tokenizer (mergekit fails here too); add them or drop this setting")
        base_raw = _load_tokenizer(base_dir, base_ref, True, trust_remote_code)
        base_tok = _strip_tokenizer(base_raw, self._vocab_size(base_i, base_raw), base_ref, trust_remote_code)
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
        if template:
            out.chat_template = template

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
        added = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in base_vocab]

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
        return TokenizerPlan(source=source, files=files, chat_template=template, n_vocab=n_vocab,
                             out_rows=out_rows, added=added)

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
        check_vocab_widths(name, metas, self.recipe.source)

    def remapped(self, pt, method):
        """A planned vocabulary tensor with its RowRemap, output shape and working memory."""
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
        return _with_remap(pt, method, P, force, kind, def_input, def_row, V, self.plan.out_rows)

    def update_config(self, config: dict) -> None:
        if self.remaps:
            set_config_vocab_size(config, self.plan.out_rows)


def truncated(pt, method):
    """``--unsafe-truncate-embeddings`` (mergekit's rule): a vocabulary tensor whose inputs differ in rows keeps
    the rows every input has, ids taken as they are; the rest are dropped."""
    rows = min(i.shape[0] for i in pt.inputs)
    shapes = [list(i.shape) for i in pt.inputs]
    log.warning("UNSAFE vocabulary truncation for %s: %s -> %s; this assumes the models' token ids agree on "
                "the rows kept (set 'tokenizer:' to align the vocabularies instead)", pt.name, shapes,
                [rows, *shapes[0][1:]])
    P = torch.arange(rows, dtype=torch.int64).repeat(len(pt.inputs), 1)
    kind = torch.full((rows,), NONE, dtype=torch.int8)
    zeros = torch.zeros(rows, dtype=torch.int64)
    return _with_remap(pt, method, P, torch.zeros(rows, dtype=torch.bool), kind, zeros.to(torch.int16), zeros,
                       rows, rows)


def _with_remap(pt, method, P, force, kind, def_input, def_row, n_vocab: int, out_rows: int):
    """``pt`` with its RowRemap (output row -> each input's row, defaults), output shape and working memory."""
    n_in = len(pt.inputs)
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
    whole = out_rows * width * (comp_sz * (n_in + ws) + out_sz)
    rm = RowRemap(
        n_vocab=n_vocab, out_rows=out_rows, perm=P.to(torch.int32), force=force, kind=kind, def_input=def_input,
        def_row=def_row.to(torch.int32), chunked=chunked, compute_dtype=comp, rest=rest,
        per_row_bytes=per_row, whole_bytes=0 if chunked else whole,
    )
    # as for any tensor: the working set of merging it at once (memory.row_bytes() divides
    # it by the rows); a chunked remap never needs more than rows_per_chunk() rows of it
    working = int(per_row * out_rows if chunked else whole + per_row * min(out_rows, MIN_CHUNK_ROWS))
    return dataclasses.replace(pt, row_remap=rm, shape=(out_rows, *rest), working_bytes=working)


# ---------------------------------------------------------------------------
# Row remaps (plan data; ray_merge.execute.rows reads the rows they name)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
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
