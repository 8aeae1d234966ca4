"""``modules:`` recipes: a model made of several modules (a text decoder, a vision tower, a projector; an
encoder and a decoder), each merged with its own slices, models and parameters.

Modules are found generically, from tensor names and config.json, and named as mergekit names them:

- a **layer stack** is a numbered container (``model.visual.blocks.N``, ``vision_tower.encoder.layers.N``)
  whose count is a layer count in the config: ``text_decoder`` is the text stack the planner already finds
  (``num_hidden_layers``, top level or in ``text_config``); a stack under a name saying vision / visual /
  image is ``vision_tower`` (counted in ``vision_config``: ``depth`` or ``num_hidden_layers``), audio is
  ``audio_tower`` (``audio_config``); ``encoder`` and ``decoder`` stacks of an encoder-decoder model are
  counted by top-level keys (``num_layers`` / ``num_decoder_layers``, ``encoder_layers`` / ``decoder_layers``);
- a module's **root** is its stack's path up to the part naming it (``visual``, ``vision_tower``,
  ``model.encoder``): the tensors under it outside the stack are the module's (patch embeddings, norms);
- tensors named like a projector (``multi_modal_projector``, ``merger``, ``mm_projector``, ``connector``) are
  ``multi_modal_projector`` (no layers: given as slices, with ``layer_range: [0, 0]``, its tensors come from
  the first slice, as mergekit's pre-layer weights do);
- everything else (embeddings, final norm, lm_head) belongs to the text decoder (or the decoder).

Modules the recipe does not list are copied from the base model (or the first model): never dropped.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

from ray_merge.errors import UserError
from ray_merge.methods import get_method
from ray_merge.planner.architecture import (
    LAYER_COUNT_KEYS,
    Layout,
    get_config_value,
    is_pre,
    layer_count_key,
    output_layers,
    set_config_value,
)
from ray_merge.planner.layer_config import check_same_layers, layer_node, layer_values, stack_layer_fields
from ray_merge.recipe.schema import OutputModule, OutputSlice, SliceSource

PROJECTOR = "multi_modal_projector"
_PROJECTOR_HINTS = ("multi_modal_projector", "mm_projector", "merger", "connector")
_TOWER_HINTS = {"vision_tower": ("vision", "visual", "image"), "audio_tower": ("audio",)}
_COUNT_KEYS = LAYER_COUNT_KEYS + ("depth", "encoder_layers", "decoder_layers", "num_decoder_layers")
_PRE_EXTRA = ("ln_pre", "pre_layrnorm", "pre_layernorm", "patch_conv")  # vision towers' first norms and convs
_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Module:
    name: str
    layout: Layout  # its layer stack (prefix None: no layers) and its tensors outside the stack
    count_key: Optional[str]  # dotted config key of its layer count ("vision_config.depth")


def infer_modules(names: list[str], config: dict, text: Layout) -> dict[str, Module]:
    """A model's modules, in checkpoint order; ``text``: the layout the planner found for the text stack."""
    stacks: dict[str, tuple[str, Optional[str], str]] = {}  # module -> (stack prefix, root, count key)
    for prefix, count in _containers(names).items():
        found = _classify(prefix)
        if found is None or found[0] in stacks:
            continue
        key = _count_key(config, found[0], count)
        if key is not None:
            stacks[found[0]] = (prefix, found[1], key)
    if "decoder" in stacks and "encoder" not in stacks:  # a decoder-only model writing `model.decoder.layers`
        stacks["text_decoder"] = stacks.pop("decoder")
    claimed = {prefix for prefix, _, _ in stacks.values()}
    main = "decoder" if "decoder" in stacks else "text_decoder"
    if main not in stacks and text.prefix and text.prefix not in claimed:
        stacks[main] = (text.prefix, None, layer_count_key(config))

    members: dict[str, list[str]] = {}
    per_layer: dict[str, list[dict[str, None]]] = {}
    for n in names:
        module, layer = _owner(n, stacks, main)
        members.setdefault(module, [])
        if layer is None:
            members[module].append(n)
        else:
            rows = per_layer.setdefault(module, [])
            while len(rows) <= layer[0]:
                rows.append({})
            rows[layer[0]][layer[1]] = None
    out = {}
    for module, non_layer in members.items():
        prefix, _, key = stacks.get(module, (None, None, None))
        layers = tuple(tuple(d) for d in per_layer.get(module, []))
        pre = tuple(n for n in non_layer if is_pre(n) or any(h in n for h in _PRE_EXTRA)
                    or n.split(".")[-2:-1] in (["shared"], ["conv1"], ["conv2"]))  # T5/Bart tied embeddings,
        # Whisper's (and audio towers') input convolutions: before the layers, as mergekit's definitions have them
        if not layers:  # a module without layers (a projector): all from the first slice, as mergekit's pre weights
            pre = tuple(non_layer)
        post = tuple(n for n in non_layer if n not in pre)
        layout = Layout(prefix, len(layers), layers[0] if layers else (), pre, post, layers)
        out[module] = Module(module, layout, key)
    return out


def _containers(names: list[str]) -> dict[str, int]:
    """Numbered containers whose indices are 0..n-1: prefix -> n."""
    found: dict[str, set[int]] = {}
    for n in names:
        m = _NUMBERED.match(n)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {p: len(idx) for p, idx in found.items() if idx == set(range(len(idx)))}


def _classify(prefix: str) -> Optional[tuple[str, str]]:
    """(module, root) of a layer stack named for a tower, an encoder or a decoder; None otherwise."""
    if any(h in prefix for h in _PROJECTOR_HINTS):
        return None
    parts = prefix.split(".")
    for i, part in enumerate(parts):
        for module, hints in _TOWER_HINTS.items():
            if any(h in part for h in hints):
                return module, ".".join(parts[: i + 1])
        if part in ("encoder", "decoder"):
            return part, ".".join(parts[: i + 1])
    return None


def _count_key(config: dict, module: str, count: int) -> Optional[str]:
    """The config key holding this stack's layer count, or None when no key says ``count``."""
    hints = _TOWER_HINTS.get(module)
    if hints:
        for sub, node in config.items():
            if isinstance(node, dict) and any(h in sub for h in hints):
                for key in _COUNT_KEYS:
                    if node.get(key) == count:
                        return f"{sub}.{key}"
        return None
    other = "decoder" if module == "encoder" else "encoder"
    keys = [k for k, v in config.items() if k in _COUNT_KEYS and v == count and other not in k
            and not isinstance(v, bool)]
    keys.sort(key=lambda k: module not in k)  # `decoder_layers` before `num_layers` for the decoder
    return keys[0] if keys else None


def _owner(name: str, stacks: dict, main: str) -> tuple[str, Optional[tuple[int, str]]]:
    """The module of a tensor, with (layer, suffix) when it is in the module's layer stack."""
    for module, (prefix, _, _) in stacks.items():
        if name.startswith(prefix + "."):
            idx, _, suffix = name[len(prefix) + 1:].partition(".")
            if idx.isdigit() and suffix:
                return module, (int(idx), suffix)
    if any(h in name for h in _PROJECTOR_HINTS):
        return PROJECTOR, None
    roots = [(len(root), module) for module, (_, root, _) in stacks.items()
             if root and name.startswith(root + ".")]
    return (max(roots)[1] if roots else main), None


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------

def plan_modules(planner, donor) -> tuple[list, dict]:
    """Every output tensor of a ``modules:`` recipe and the output config (each module's layer fields
    rewritten; the dtype is the planner's to set); ``planner``: plan.Planner, ``donor``: the metadata of the
    model whose config and unlisted modules are used."""
    recipe = planner.recipe
    found = {}

    def modules_of(ref):
        if ref not in found:
            m = planner.meta(ref)
            names = sorted(m.index, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
            found[ref] = infer_modules(names, m.config, m.layout)
        return found[ref]

    donor_modules = modules_of(donor.ref)
    for name in recipe.modules:
        if name not in donor_modules:
            raise UserError(f"model {donor.ref} has no module {name!r} (its modules: {', '.join(donor_modules)})",
                            source=recipe.source, key=f"modules.{name}")
    tensors = []
    cfg = copy.deepcopy(donor.config)
    copy_method = get_method("copy", internal=True)
    for name, module in donor_modules.items():
        out = recipe.modules.get(name)
        if out is None:  # not in the recipe: the donor's tensors, unchanged
            carried = OutputSlice(sources=[SliceSource(donor.ref, None)])
            lay = module.layout
            names = list(lay.pre) + [lay.layer_name(i, s) for i in range(lay.num_layers) for s in lay.suffixes(i)]
            for tensor in names + list(lay.post):
                pt = planner._plan_tensor(tensor, [(donor.ref, tensor)], carried, t=0.0, method=copy_method)
                if pt:
                    tensors.append(pt)
            continue
        slices = _normalized(planner, name, out, modules_of)
        stack = _plan_module(planner, module, out, slices, modules_of, tensors)
        if not out.from_models:
            cfg = _stack_config(planner, cfg, donor, module, stack, modules_of)
    return tensors, cfg


def _normalized(planner, name: str, out: OutputModule, modules_of) -> list[OutputSlice]:
    """The module's slices with every layer range set; for `models:`, the base joins the sources."""
    recipe = planner.recipe
    result = []
    for i, sl in enumerate(out.slices):
        sources = list(sl.sources)
        for j, src in enumerate(sources):
            key = (f"modules.{name}.models[{j}]" if out.from_models
                   else f"modules.{name}.slices[{i}].sources[{j}].layer_range")
            module = modules_of(src.model).get(name)
            if module is None:
                raise UserError(f"model {src.model} has no module {name!r}", source=recipe.source, key=key)
            n = module.layout.num_layers
            if src.layer_range is None:
                sources[j] = dataclasses.replace(src, layer_range=(0, n))
            elif src.layer_range[1] > n:
                raise UserError(f"{list(src.layer_range)} is out of range: module {name} of {src.model} has "
                                f"{n} layers", source=recipe.source, key=key)
            elif src.layer_range[0] == src.layer_range[1] and n > 0:
                raise UserError(f"{list(src.layer_range)} is empty: module {name} of {src.model} has {n} layers "
                                "(an empty range is for a module without layers, such as a projector)",
                                source=recipe.source, key=key)
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if out.from_models and len(lengths) > 1:
            raise UserError(f"models have different layer counts {sorted(lengths)} in module {name}",
                            source=recipe.source, key=f"modules.{name}.models")
        base = sl.base_model or recipe.base_model
        if out.from_models and base is not None and all(s.model != base for s in sources):
            n = modules_of(base)[name].layout.num_layers
            sources.append(SliceSource(model=base, layer_range=(0, n)))
        result.append(OutputSlice(sources=sources, base_model=sl.base_model, parameters=sl.parameters))
    return result


def _plan_module(planner, module: Module, out: OutputModule, slices: list[OutputSlice], modules_of,
                 tensors: list) -> list[tuple]:
    """Plan one listed module (pre tensors from the first slice, its layers, post tensors from the last);
    return where each output layer comes from: (model, layer)."""
    name, params = module.name, out.parameters
    first, last = slices[0], slices[-1]
    layers = output_layers(slices)
    count = lambda ref: modules_of(ref)[name].layout.num_layers  # noqa: E731
    for tensor in module.layout.pre:  # a tensor packing one block per layer is restacked with the layers
        pt = planner._plan_outside(tensor, first, layers, count, module_params=params)
        if pt:
            tensors.append(pt)
    stack = []
    for sl in slices:
        start0, end0 = sl.sources[0].layer_range
        n = end0 - start0
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            layouts = [modules_of(src.model)[name].layout for src in sl.sources]
            suffixes = _layer_suffixes(planner, name, sl, offset, layouts, modules_of)
            for suffix in suffixes:
                inputs = [(src.model, lay.layer_name(src.layer_range[0] + offset, suffix))
                          for src, lay in zip(sl.sources, layouts)]
                pt = planner._plan_tensor(module.layout.layer_name(len(stack), suffix), inputs, sl, t=t,
                                          module_params=params)
                if pt:
                    tensors.append(pt)
            stack.append((sl.sources[0].model, start0 + offset))
    for tensor in module.layout.post:
        pt = planner._plan_outside(tensor, last, layers, count, module_params=params)
        if pt:
            tensors.append(pt)
    return stack


def _layer_suffixes(planner, name: str, sl: OutputSlice, offset: int, layouts: list[Layout],
                    modules_of) -> tuple[str, ...]:
    """The tensors of one output layer: the sources' layers must hold the same tensors and (but with
    --allow-crimes) have the same per-layer config values."""
    rows = [(src.model, lay, src.layer_range[0] + offset) for src, lay in zip(sl.sources, layouts)]
    ref0, lay0, i0 = rows[0]
    suffixes = lay0.suffixes(i0)
    for ref, lay, i in rows[1:]:
        if set(lay.suffixes(i)) != set(suffixes):
            raise UserError(f"layer {i0} of module {name} of {ref0} and layer {i} of {ref} have different "
                            "tensors; layers of different structure cannot be merged", source=planner.recipe.source)
    check_same_layers([(f"layer {i} of module {name} of {ref}", _values(planner, planner.meta(ref),
                                                                          modules_of(ref)[name]), i)
                       for ref, _, i in rows], planner.allow_crimes)
    return suffixes


def _values(planner, meta, module: Module) -> dict[str, list]:
    """The per-layer config fields of a module (layer_config's reading of its config node); {} when unknown."""
    if module.count_key is None:
        return {}
    if module.count_key == layer_count_key(meta.config):
        return planner._layer_values(meta)
    parent = module.count_key.rpartition(".")[0]
    if not parent:  # a second top-level count (an encoder-decoder's decoder): its fields are not told apart
        return {}
    node = get_config_value(meta.config, parent)
    count_key = layer_node(node)[1] if isinstance(node, dict) else None
    if count_key is not None and node[count_key] == module.layout.num_layers:
        return layer_values(node)
    return {}


def _stack_config(planner, cfg: dict, donor, module: Module, stack: list[tuple], modules_of) -> dict:
    """Rewrite the module's layer count (and per-layer fields its config node has) for its new stack."""
    if module.count_key is None:
        return cfg
    labels = [f"layer {i} of module {module.name} of {ref}" for ref, i in stack]
    rows = [(_values(planner, planner.meta(ref), modules_of(ref)[module.name]), i) for ref, i in stack]
    donor_values = _values(planner, donor, module)
    if module.count_key == layer_count_key(cfg):
        cfg = stack_layer_fields(cfg, donor_values, rows, labels)
        text = cfg.get("text_config")
        if isinstance(text, dict) and text.get(module.count_key) == module.layout.num_layers:
            text[module.count_key] = len(stack)  # a flat config that repeats the text layer count
        return cfg
    parent, _, key = module.count_key.rpartition(".")
    if not parent:
        cfg[key] = len(stack)
        return cfg
    node = get_config_value(cfg, parent)
    if donor_values:
        node = stack_layer_fields(node, donor_values, rows, labels)
        set_config_value(cfg, parent, node)
    for k in _COUNT_KEYS:  # every count key saying the old count (vision configs: depth and num_hidden_layers)
        if node.get(k) == module.layout.num_layers or k == key:
            node[k] = len(stack)
    return cfg
