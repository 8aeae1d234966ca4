"""Layer structure inferred from tensor names and config.json; no per-architecture tables.

A decoder checkpoint has numbered blocks (``model.layers.7.mlp.up_proj.weight``,
``transformer.h.7.attn.c_attn.weight``) and a few tensors outside them. We find the
numbered container whose index count matches the config's layer count.

Layers need not be alike: each layer's tensors are read from its own names (dense layers then MoE
layers, attention and Mamba layers, linear- and full-attention layers).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.recipe.schema import OutputSlice

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")
_POST_HINTS = ("lm_head", "embed_out")  # output heads, though some are named like embeddings (GPT-NeoX)


def is_pre(name: str) -> bool:
    """A tensor outside the layers that comes before them (an embedding), told by its name."""
    return any(h in name for h in _PRE_HINTS) and not any(h in name for h in _POST_HINTS)


PER_LAYER_WIDTH_KEYS = ("hidden_size_per_layer_input",)  # config keys giving the width of one packed block


def packed_dim(name: str, shape: tuple[int, ...], num_layers: int, config: dict) -> Optional[int]:
    """The dimension of a tensor outside the layers that packs one block per layer (Gemma 3n / Gemma 4's
    per-layer input embeddings [vocab, layers x width] and projection [layers x width, hidden]), or None.

    Told by its name (``per_layer``) and the config's per-layer width when it has one (else a dimension
    divisible by the layer count). When two dimensions fit, an embedding packs its columns (its rows are
    tokens) and a linear weight its rows (its output features)."""
    if "per_layer" not in name or num_layers < 2:
        return None
    width = _config_int(config, PER_LAYER_WIDTH_KEYS)
    if width is not None:
        dims = [k for k, d in enumerate(shape) if d == width * num_layers]
    else:
        dims = [k for k, d in enumerate(shape) if d % num_layers == 0 and d > num_layers]
    if not dims:
        return None
    if len(dims) == 1:
        return dims[0]
    return dims[-1] if is_pre(name) else dims[0]


def _config_int(config: dict, keys: tuple[str, ...]) -> Optional[int]:
    for node in (config, config.get("text_config")):
        if isinstance(node, dict):
            for key in keys:
                v = node.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def layer_count_key(config: dict) -> Optional[str]:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key
    text = config.get("text_config")
    if isinstance(text, dict):
        for key in LAYER_COUNT_KEYS:
            if isinstance(text.get(key), int):
                return f"text_config.{key}"
    return None


def get_config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def set_config_value(config: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


@dataclass(frozen=True)
class Layout:
    """Where the layers are: ``{prefix}.{i}.{suffix}`` for each layer i."""

    prefix: Optional[str]
    num_layers: int
    layer_suffixes: tuple[str, ...]  # layer 0's, in checkpoint order
    pre: tuple[str, ...]  # non-layer tensors before the layers (embeddings)
    post: tuple[str, ...]  # non-layer tensors after (final norm, lm_head)
    per_layer: tuple[tuple[str, ...], ...] = ()  # each layer's suffixes, in checkpoint order

    def suffixes(self, index: int) -> tuple[str, ...]:
        """The tensors of layer ``index`` (layers may differ: dense and MoE, attention and Mamba)."""
        return self.per_layer[index] if self.per_layer else self.layer_suffixes

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"

    def split(self, name: str) -> Optional[tuple[int, str]]:
        if self.prefix is None or not name.startswith(self.prefix + "."):
            return None
        rest = name[len(self.prefix) + 1 :]
        idx, _, suffix = rest.partition(".")
        return (int(idx), suffix) if idx.isdigit() else None


def infer_layout(names: list[str], config: dict, label: str) -> Layout:
    key = layer_count_key(config)
    expected = get_config_value(config, key) if key else None
    by_prefix: dict[str, set[int]] = defaultdict(set)
    for n in names:
        m = _NUMBERED.match(n)
        if m:
            by_prefix[m.group(1)].add(int(m.group(2)))
    # the container whose indices are exactly 0..L-1 for the configured L, else the largest
    candidates = sorted(by_prefix.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    prefix = None
    for p, idxs in candidates:
        if expected is None or idxs == set(range(expected)):
            prefix = p
            break
    if prefix is None and expected == 0:
        prefix = None
    elif prefix is None:
        found = {p: len(i) for p, i in candidates[:3]}
        raise UserError(
            f"model {label}: config says {key}={expected} but no numbered tensor block matches "
            f"(found {found or 'none'})"
        )
    num_layers = len(by_prefix[prefix]) if prefix else 0

    per_layer: list[dict[str, None]] = [{} for _ in range(num_layers)]  # ordered sets
    pre, post = [], []
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$") if prefix else None
    for n in names:
        m = layer_re.match(n) if layer_re else None
        if m:
            per_layer[int(m.group(1))][m.group(2)] = None
            continue
        (pre if is_pre(n) else post).append(n)
    layers = tuple(tuple(d) for d in per_layer)
    return Layout(prefix, num_layers, layers[0] if layers else (), tuple(pre), tuple(post), layers)


def output_layers(slices: list[OutputSlice]) -> list[tuple[OutputSlice, int, float]]:
    """Each output layer of ``slices``: its slice, its offset in the slice and its t (for gradients)."""
    out = []
    for sl in slices:
        start, end = sl.sources[0].layer_range
        n = end - start
        out.extend((sl, offset, offset / (n - 1) if n > 1 else 1.0) for offset in range(n))
    return out
