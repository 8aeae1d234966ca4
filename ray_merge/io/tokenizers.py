"""Reading and saving Hugging Face tokenizers (the files that make one, loading, stripping tokens past
a model's vocabulary).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

from ray_merge.errors import UserError, one_line

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)


log = logging.getLogger("ray_merge")


def _load_tokenizer(path: str, label: str, required: bool, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing files, bad JSON, unknown classes
        if required:
            raise UserError(f"model {label}: cannot load its tokenizer ({type(e).__name__}: {one_line(e)})")
        log.warning("model %s: cannot load its tokenizer (%s); assuming the base model's", label, one_line(e))
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


def _strip_tokenizer(tok, vocab_size: int, label: str, trust_remote_code: bool = False):
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
        out = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    log.info("model %s: %d tokenizer entries past vocab_size=%d ignored", label, len(drop), vocab_size)
    return out
