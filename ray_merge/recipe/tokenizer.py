"""A recipe's tokenizer settings (``tokenizer:`` block or the legacy ``tokenizer_source``), parsed and
checked before any model is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ray_merge.chat_template import check_chat_template
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef

TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}


TOKEN_KEYS = {"source", "force"}


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

    parse_tokenizer_settings(recipe, err)
    check_chat_template(recipe.chat_template, err)
