"""Per-layer fields of config.json: read each layer's values, and write them for a new stack of layers.

A frankenmerge (or layer stacking) takes layers from several places; every config field that says
something about individual layers must follow them, not only the layer count. Fields are found
generically, in the config node holding the layer count (the top level, or ``text_config``):

- **per-layer lists**: a list whose length is the layer count (``layer_types``, ``no_rope_layers``,
  ``mlp_layer_types``, ``num_attention_heads_per_layer``, ...): one value per layer;
- **index lists**: a strictly increasing list of layer numbers under a key naming layers or indices
  (``mlp_only_layers``, ``moe_layers``, ``attn_layer_indices``, ``full_attn_idxs``, ``hybrid_layer_ids``):
  whether each layer is listed;
- **per-layer dicts**: a dict keyed by layer numbers (Gemma 4's ``per_layer_config``: ``{"05": {...}}``);
- **scalar rules** (the only special cases, as they are arithmetic, not data): ``first_k_dense_replace``
  and ``num_dense_layers`` (the first k layers are dense), ``moe_layer_start_index`` /
  ``moe_layer_end_index`` / ``moe_layer_interval`` (ERNIE 4.5), ``decoder_sparse_step`` (Qwen MoE, with
  ``mlp_only_layers``), ``attn_layer_period`` / ``attn_layer_offset`` and ``expert_layer_period`` /
  ``expert_layer_offset`` (Jamba). For a new stack the scalars are solved again; a stack no setting of
  them describes is an error naming the field and the layers.

Fields that a config class derives from a scalar when the list is absent (``layer_types`` from
``sliding_window_pattern``) are taken from transformers' config class for the ``model_type`` when
config.json leaves them out, and written explicitly for the new stack.
"""
from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.planner.architecture import LAYER_COUNT_KEYS

_INDEX_KEY = re.compile(r"(layers|layer_ids|indices|idxs|_ids)$")
_NOT_PER_LAYER = {"architectures"}


@dataclass(frozen=True)
class _Rule:
    keys: tuple[str, ...]  # the scalars, all needed
    value: Callable[[int, dict], bool]  # layer i's value from the scalars
    solve: Callable[[list[bool], dict], list[dict]]  # candidate settings for a stack of values


def _solve_prefix(key):
    return lambda flags, old: [{key: flags.index(False) if False in flags else len(flags)}]


def _solve_ernie(flags, old):
    moe = [i for i, f in enumerate(flags) if f]
    if not moe:
        return [{"moe_layer_start_index": len(flags), "moe_layer_end_index": len(flags)}]
    return [{"moe_layer_start_index": moe[0], "moe_layer_end_index": moe[-1], "moe_layer_interval": step}
            for step in (old.get("moe_layer_interval") or 1, 1)]


def _solve_period(period_key, offset_key):
    def solve(flags, old):
        n = len(flags)
        periods = [old[period_key]] + [p for p in range(1, n + 1) if p != old[period_key]]
        return [{period_key: p, offset_key: o} for p in periods for o in range(p)]
    return solve


_RULES = (
    _Rule(("first_k_dense_replace",), lambda i, c: i < c["first_k_dense_replace"],
          _solve_prefix("first_k_dense_replace")),
    _Rule(("num_dense_layers",), lambda i, c: i < c["num_dense_layers"], _solve_prefix("num_dense_layers")),
    _Rule(("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
          lambda i, c: (i + 1) % c["moe_layer_interval"] == 0 and c["moe_layer_start_index"] <= i
          and (c["moe_layer_end_index"] < 0 or i <= c["moe_layer_end_index"]), _solve_ernie),
    # Qwen MoE: sparse where (i + 1) % step == 0 (and not in mlp_only_layers, an index list of its own)
    _Rule(("decoder_sparse_step",), lambda i, c: c["decoder_sparse_step"] > 0
          and (i + 1) % c["decoder_sparse_step"] == 0,
          lambda flags, old: [{"decoder_sparse_step": s} for s in range(1, len(flags) + 1)]),
    _Rule(("attn_layer_period", "attn_layer_offset"),
          lambda i, c: i % c["attn_layer_period"] == c["attn_layer_offset"],
          _solve_period("attn_layer_period", "attn_layer_offset")),
    _Rule(("expert_layer_period", "expert_layer_offset"),
          lambda i, c: i % c["expert_layer_period"] == c["expert_layer_offset"],
          _solve_period("expert_layer_period", "expert_layer_offset")),
)


def layer_node(config: dict) -> tuple[dict, Optional[str]]:
    """The config node holding the layer count (the config itself or its text_config) and the key."""
    for node in (config, config.get("text_config")):
        if isinstance(node, dict):
            for key in LAYER_COUNT_KEYS:
                if isinstance(node.get(key), int):
                    return node, key
    return config, None


_TEXT = "text_config."


def _nested_text(config: dict, node: dict, count_key: Optional[str]) -> Optional[tuple[dict, str]]:
    """A flat config (the layer count at the top level, as older multimodal configs write it) whose
    ``text_config`` repeats that count: the text node and its count key, whose per-layer fields follow the
    layers too (``text_config.layer_types``)."""
    text = config.get("text_config")
    if node is not config or count_key is None or not isinstance(text, dict):
        return None
    key = next((k for k in LAYER_COUNT_KEYS if text.get(k) == node[count_key]), None)
    return (text, key) if key else None


def _is_index_list(key: str, value, n: int) -> bool:
    return (isinstance(value, list) and bool(_INDEX_KEY.search(key))
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in value)
            and all(a < b for a, b in itertools.pairwise(value))
            and (len(value) != n or n == 0 or value == list(range(n))))


def _is_layer_dict(value, n: int) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and k.isdigit() and int(k) < n for k in value))


def _derived(config: dict) -> dict:
    """The config as transformers' config class fills it in (lists derived from scalars), or {}."""
    model_type = config.get("model_type")
    if not model_type:
        return {}
    try:
        import transformers

        fields = {k: v for k, v in copy.deepcopy(config).items() if k != "model_type"}
        cfg = transformers.AutoConfig.for_model(model_type, **fields)
        derived = cfg.to_dict()
    except Exception:  # noqa: BLE001 -- an unknown or remote-code model type: config.json as it is
        return {}
    node, _ = layer_node(config)
    if node is not config:
        derived = derived.get("text_config") or {}
    return derived


def layer_values(config: dict) -> dict[str, list]:
    """Every per-layer field of ``config``: field -> one value per layer (``text_config.``-prefixed: those of a
    flat config's text_config, which repeats the layer count)."""
    node, count_key = layer_node(config)
    if count_key is None:
        return {}
    derived = _derived(config)
    out = _node_values(node, node[count_key], derived)
    nested = _nested_text(config, node, count_key)
    if nested is not None:
        text_values = _node_values(nested[0], node[count_key], derived.get("text_config") or {})
        out.update({_TEXT + k: v for k, v in text_values.items()})
    return out


def _node_values(node: dict, n: int, derived: dict) -> dict[str, list]:
    """The per-layer fields of one config node of ``n`` layers (``derived``: the node as its config class
    fills it in)."""
    fields = dict(node)
    for key, value in derived.items():  # lists the config class derives where config.json has none
        if fields.get(key) is None and isinstance(value, (list, dict)):
            fields[key] = value
    out: dict[str, list] = {}
    for key, value in fields.items():
        if key in _NOT_PER_LAYER:
            continue
        if _is_index_list(key, value, n):
            out[key] = [i in value for i in range(n)]
        elif isinstance(value, list) and len(value) == n and n > 0:
            out[key] = list(value)
        elif _is_layer_dict(value, n):
            width = len(next(iter(value)))
            by_index = {int(k): v for k, v in value.items()}
            out[key] = [by_index.get(i) for i in range(n)]
            out[key + "#width"] = [width] * n  # how the keys are written
    for rule in _RULES:
        vals = {k: fields.get(k) for k in rule.keys}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals.values()):
            try:
                out["#" + ",".join(rule.keys)] = [rule.value(i, vals) for i in range(n)]
            except ZeroDivisionError:
                pass
    return out


def stack_layer_fields(donor: dict, donor_values: dict[str, list], stack: list[tuple[dict[str, list], int]],
                       labels: list[str]) -> dict:
    """A copy of the donor's config whose per-layer fields describe a new stack of layers: ``stack[j]`` holds the
    per-layer values (``layer_values``) of the model output layer j comes from and its layer number there;
    ``labels[j]`` names that layer in errors."""
    out = copy.deepcopy(donor)
    node, count_key = layer_node(out)
    if count_key is None:
        return out
    nested = _nested_text(out, node, count_key)
    node[count_key] = len(stack)
    if nested is not None:
        nested[0][nested[1]] = len(stack)
    for key in donor_values:
        if key.endswith("#width"):
            continue
        stacked = []
        for j, (values, i) in enumerate(stack):
            if key not in values:
                raise UserError(f"config field {key.lstrip('#')} of the output model is not in the config of "
                                f"{labels[j]}; its value for that layer is unknown")
            stacked.append(values[key][i])
        if key.startswith(_TEXT) and nested is not None:
            sub = {k[len(_TEXT):]: v for k, v in donor_values.items() if k.startswith(_TEXT)}
            _write(nested[0], key[len(_TEXT):], stacked, sub, labels)
        else:
            _write(node, key, stacked, donor_values, labels)
    return out


def _write(node: dict, key: str, stacked: list, fields: dict, labels: list[str]) -> None:
    n = len(stacked)
    if key.startswith("#"):
        keys = tuple(key[1:].split(","))
        rule = next(r for r in _RULES if r.keys == keys)
        old = {k: node.get(k) for k in keys}
        for cand in rule.solve(stacked, old):
            merged = {**old, **cand}
            if all(rule.value(i, merged) == stacked[i] for i in range(n)):
                node.update(cand)
                return
        desc = ", ".join(f"{labels[j]}: {v}" for j, v in enumerate(stacked))
        raise UserError(f"the stacked layers cannot be described by config fields {', '.join(keys)} "
                        f"(per output layer: {desc})")
    original = node.get(key)
    if isinstance(original, dict) or key + "#width" in fields:
        width = fields[key + "#width"][0]
        node[key] = {str(j).zfill(width): v for j, v in enumerate(stacked) if v is not None}
    elif _is_index_list(key, original, len(fields[key])) or (original is None and all(
            isinstance(v, bool) for v in stacked)):
        node[key] = [j for j, v in enumerate(stacked) if v]
    else:
        node[key] = stacked


def check_same_layers(rows: list[tuple[str, dict[str, list], int]], allow_crimes: bool) -> None:
    """The layers merged into one output layer must have the same per-layer config values (the same kind of
    attention, of MLP ...); ``rows``: (what the layer is, its model's ``layer_values``, its layer number).
    --allow-crimes lets them differ (their tensors must still match)."""
    if allow_crimes or len(rows) < 2:
        return
    for key in rows[0][1]:
        if key.endswith("#width"):
            continue
        seen = {label: values[key][i] for label, values, i in rows if key in values}
        if len({repr(v) for v in seen.values()}) > 1:
            desc = "; ".join(f"{w}: {v}" for w, v in seen.items())
            raise UserError(f"merging layers of different kinds (config field {key.lstrip('#')}: {desc}); "
                            "pass --allow-crimes to merge them anyway")
