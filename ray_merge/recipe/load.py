"""Recipes: mergekit's YAML format, loaded with OmegaConf and validated into typed objects.

Everything that can be checked without reading a model is checked here, and every
error names the file, the key path and the problem.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Optional, Union

import torch
import yaml
from omegaconf import OmegaConf, grammar_parser
from omegaconf.errors import OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from ray_merge.dtypes import DTYPE_BY_NAME
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef
from ray_merge.methods import all_methods, get_method
from ray_merge.methods.base import MergeMethod, Param
from ray_merge.recipe.params import _is_scalar
from ray_merge.recipe.schema import (
    DTYPE_ALIASES,
    DTYPES,
    TOP_LEVEL_KEYS,
    OutputModule,
    OutputSlice,
    Recipe,
    SliceSource,
)
from ray_merge.recipe.tokenizer import check_recipe

Scalar = Union[bool, int, float, str]

log = logging.getLogger("ray_merge")


def load_yaml(path: str, overrides: Optional[list[str]] = None, *, what: str = "recipe") -> dict:
    """Read a YAML file with OmegaConf, apply ``key=value`` overrides, return plain data.

    A recipe may interpolate other values (``${key}``) but call no resolver (``${oc.env:X}``,
    ...); other files (a search config) may.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found", source=path)
    try:
        conf = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise UserError(f"malformed YAML: {one_line(e)}", source=path)
    return _apply_overrides(conf, path, overrides, what)


def _apply_overrides(conf, source: str, overrides: Optional[list[str]], what: str = "recipe") -> dict:
    if not OmegaConf.is_dict(conf):
        raise UserError(f"a {what} must be a mapping of keys", source=source)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r}", source=source)
        key, value = item.split("=", 1)
        try:
            OmegaConf.update(conf, key.strip(), yaml.safe_load(value), force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise UserError(f"cannot apply --set {item!r}: {one_line(e)}", source=source)
    if what == "recipe":
        _refuse_resolvers(OmegaConf.to_container(conf, resolve=False), source)
    try:
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"cannot resolve the {what}: {one_line(e)}", source=source)


def _refuse_resolvers(data: Any, source: str, key: str = "") -> None:
    """Refuse interpolations that call a resolver (``${oc.env:X}``, ...): only ``${key}`` references.

    Resolvers read the environment (whose values would end up in the output's model card and
    config) or build values; a recipe is plain data. Checked after ``--set``, so an override cannot
    bring one in either.
    """
    if isinstance(data, dict):
        for k, v in data.items():
            _refuse_resolvers(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _refuse_resolvers(v, source, f"{key}[{i}]")
    elif isinstance(data, str) and "${" in data:
        try:
            nodes = [grammar_parser.parse(data)]
        except OmegaConfBaseException:
            return  # not an interpolation OmegaConf can read: resolving reports it
        while nodes:
            node = nodes.pop()
            if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
                raise UserError(f"recipes take no resolver interpolations (${{{node.resolverName().getText()}:...}}); "
                                f"only ${{key}} references to other values", source=source, key=key)
            nodes.extend(getattr(node, "children", None) or [])


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe file, apply ``key=value`` overrides, validate."""
    return _validate(load_yaml(path, overrides), path)


def recipe_from_dict(data: dict, source: str = "<recipe>", overrides: Optional[list[str]] = None) -> Recipe:
    try:
        conf = OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise UserError(f"cannot read the recipe: {one_line(e)}", source=source)
    return recipe_from_conf(conf, source=source, overrides=overrides)


def recipe_from_conf(conf, source: str, overrides: Optional[list[str]] = None) -> Recipe:
    return _validate(_apply_overrides(conf, source, overrides), source)


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _validate(data: dict, source: str) -> Recipe:

    def err(key: str, msg: str) -> UserError:
        return UserError(msg, source=source, key=key)

    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise err(unknown[0], f"unknown key (known: {', '.join(sorted(TOP_LEVEL_KEYS))})")

    if "merge_method" not in data:
        raise err("merge_method", "missing")
    method_name = data["merge_method"]
    if not isinstance(method_name, str):
        raise err("merge_method", "must be a string")
    try:
        method = get_method(method_name)
    except UserError as e:
        raise err("merge_method", str(e))

    given = [k for k in ("models", "slices", "modules") if data.get(k) is not None]
    if len(given) != 1:
        raise err(given[1] if given else "models", "give exactly one of 'models', 'slices' or 'modules'")
    has_models = given == ["models"]

    base = _model_ref(data.get("base_model"), "base_model", err) if data.get("base_model") is not None else None
    params = _parameters(data.get("parameters"), "parameters", err)

    slices: list[OutputSlice] = []
    modules: dict[str, OutputModule] = {}
    if has_models:
        slices = [_models_slice(data["models"], "models", err)]
    elif given == ["slices"]:
        slices = _slices(data["slices"], "slices", err)
    else:
        modules = _modules(data["modules"], err)

    dtype = _dtype(data.get("dtype"), "dtype", err)
    out_dtype = _dtype(data.get("out_dtype"), "out_dtype", err)
    blocks = list(_parameter_blocks(params, slices, from_models=has_models))
    for name, mod in modules.items():
        blocks.append((f"modules.{name}.parameters", mod.parameters))
        blocks.extend(_parameter_blocks(None, mod.slices, mod.from_models, prefix=f"modules.{name}."))
    _check_parameters(method, blocks, dtype, source, err)

    # Base model requirements.
    for s in slices + [s for mod in modules.values() for s in mod.slices]:
        effective_base = s.base_model or base
        if method.base_model == "required" and effective_base is None:
            raise err("base_model", f"merge method {method.name!r} needs a base_model")

    tokenizer_source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer_source is not None and tokenizer is not None:
        raise err("tokenizer", "give either 'tokenizer' or 'tokenizer_source', not both")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise err("tokenizer_source", "must be 'union', 'base' or a model reference")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise err("tokenizer", "must be a mapping (source, tokens, pad_to_multiple_of)")
    chat_template = data.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise err("chat_template", "must be a string")

    recipe = Recipe(
        merge_method=method.name,
        slices=slices,
        from_models=has_models,
        base_model=base,
        parameters=params,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=chat_template,
        source=source,
        raw=data,
        modules=modules,
    )

    check_recipe(recipe, err)  # the tokenizer block and the chat template (rendered in a sandbox)
    return recipe


def _models_slice(models: Any, key: str, err) -> OutputSlice:
    """A `models:` list: one slice whose sources span every layer."""
    if not isinstance(models, list) or not models:
        raise err(key, "must be a non-empty list")
    sources = []
    for i, m in enumerate(models):
        mkey = f"{key}[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict):
            raise err(mkey, "must be a mapping with a 'model' key")
        _no_unknown(m, {"model", "parameters"}, mkey, err)
        if "model" not in m:
            raise err(f"{mkey}.model", "missing")
        sources.append(
            SliceSource(
                model=_model_ref(m["model"], f"{mkey}.model", err),
                layer_range=None,
                parameters=_parameters(m.get("parameters"), f"{mkey}.parameters", err),
            )
        )
    return OutputSlice(sources=sources)


def _slices(raw_slices: Any, key: str, err, empty_ok: bool = False) -> list[OutputSlice]:
    """``empty_ok``: a module's slices, where ``[0, 0]`` names a module without layers (a projector)."""
    if not isinstance(raw_slices, list) or not raw_slices:
        raise err(key, "must be a non-empty list")
    slices = []
    for i, s in enumerate(raw_slices):
        slkey = f"{key}[{i}]"
        if not isinstance(s, dict):
            raise err(slkey, "must be a mapping with 'sources'")
        _no_unknown(s, {"sources", "base_model", "parameters", "residual_weight"}, slkey, err)
        srcs = s.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise err(f"{slkey}.sources", "must be a non-empty list")
        sources = []
        for j, src in enumerate(srcs):
            skey = f"{slkey}.sources[{j}]"
            if not isinstance(src, dict):
                raise err(skey, "must be a mapping with 'model' and 'layer_range'")
            _no_unknown(src, {"model", "layer_range", "parameters"}, skey, err)
            if "model" not in src:
                raise err(f"{skey}.model", "missing")
            lr = src.get("layer_range")
            if (
                not isinstance(lr, list)
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            ):
                raise err(f"{skey}.layer_range", "must be a list of two integers [start, end]")
            if lr[0] < 0 or lr[1] < lr[0] or (lr[1] == lr[0] and not empty_ok):
                raise err(f"{skey}.layer_range", f"{lr} is empty or negative")
            sources.append(
                SliceSource(
                    model=_model_ref(src["model"], f"{skey}.model", err),
                    layer_range=(lr[0], lr[1]),
                    parameters=_parameters(src.get("parameters"), f"{skey}.parameters", err),
                )
            )
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
        if len(lengths) != 1:
            raise err(f"{slkey}.sources", "every source of a slice must span the same number of layers")
        slice_base = s.get("base_model")
        slices.append(
            OutputSlice(
                sources=sources,
                base_model=_model_ref(slice_base, f"{slkey}.base_model", err) if slice_base else None,
                parameters=_parameters(s.get("parameters"), f"{slkey}.parameters", err),
            )
        )
    return slices


def _modules(raw: Any, err) -> dict[str, OutputModule]:
    """``modules: {NAME: {models: [...] | slices: [...], parameters: {...}}}`` (mergekit's multi-module form)."""
    if not isinstance(raw, dict) or not raw:
        raise err("modules", "must be a non-empty mapping of module names (text_decoder, vision_tower, ...) "
                             "to their models or slices")
    out = {}
    for name, m in raw.items():
        key = f"modules.{name}"
        if not isinstance(name, str) or not name:
            raise err(key, "a module name must be a non-empty string")
        if not isinstance(m, dict):
            raise err(key, "must be a mapping with 'models' or 'slices'")
        _no_unknown(m, {"models", "slices", "parameters"}, key, err)
        has_models, has_slices = m.get("models") is not None, m.get("slices") is not None
        if has_models == has_slices:
            raise err(key, "give exactly one of 'models' or 'slices'")
        slices = [_models_slice(m["models"], f"{key}.models", err)] if has_models \
            else _slices(m["slices"], f"{key}.slices", err, empty_ok=True)
        out[name] = OutputModule(slices=slices, from_models=has_models,
                                 parameters=_parameters(m.get("parameters"), f"{key}.parameters", err))
    return out


def _no_unknown(d: dict, allowed: set, key: str, err) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise err(f"{key}.{extra[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _model_ref(value: Any, key: str, err) -> ModelRef:
    if not isinstance(value, str) or not value.strip():
        raise err(key, "must be a model path or hub id")
    return ModelRef.parse(value)


def _dtype(value: Any, key: str, err) -> Optional[str]:
    if value is None:
        return None
    v = DTYPE_ALIASES.get(str(value), str(value))
    if v not in DTYPES:
        raise err(key, f"unknown dtype {value!r} (use one of {', '.join(DTYPES)})")
    return v


def _parameters(value: Any, key: str, err) -> dict:
    """Check the shape of a parameters block: scalars, gradients, filter lists."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(key, "must be a mapping of parameter names to values")
    for name, setting in value.items():
        _check_setting(setting, f"{key}.{name}", err)
    return dict(value)


def _check_setting(setting: Any, key: str, err) -> None:
    if _is_scalar(setting):
        return
    if isinstance(setting, dict):
        _no_unknown(setting, {"filter", "value"}, key, err)
        if "value" not in setting:
            raise err(key, "a conditional parameter needs a 'value'")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise err(f"{key}.filter", "must be a string")
        _check_setting(setting["value"], f"{key}.value", err)
        return
    if isinstance(setting, list):
        if not setting:
            raise err(key, "empty list")
        if all(_is_scalar(v) for v in setting):
            return  # a gradient
        for i, item in enumerate(setting):
            if not isinstance(item, dict):
                raise err(f"{key}[{i}]", "mix of values and conditions; use a list of {filter, value}")
            _check_setting(item, f"{key}[{i}]", err)
        return
    raise err(key, f"unsupported value {setting!r}")


def _check_parameters(method: MergeMethod, blocks, dtype: Optional[str], source: str, err) -> None:
    """Check every parameter value against the method's declaration (type, finite, range).

    A name the method does not take but another method does is ignored with a warning, as
    mergekit does (published recipes carry e.g. ``weight`` on slerp), and removed from its
    block so that it never reaches the method; a name no method takes is a typo.
    """
    declared = {p.name: p for p in method.params}
    ignored: dict[str, list[str]] = {}
    for key, block in blocks:
        for name in list(block):
            param = declared.get(name)
            if param is None:
                if name not in _all_parameter_names():
                    raise err(f"{key}.{name}", _unknown_parameter(method, name))
                ignored.setdefault(name, []).append(key)
                del block[name]
                continue
            for where, value in _scalars(block[name], f"{key}.{name}"):
                problem = param.problem(value) or _overflow(param, value, dtype)
                if problem:
                    raise err(where, problem)
    for name, keys in ignored.items():
        log.warning("%s: merge method %r ignores parameter %r (given in %s)", source, method.name, name,
                    ", ".join(keys))


def _all_parameter_names() -> set[str]:
    return {p.name for m in all_methods().values() for p in m.params}


def _unknown_parameter(method: MergeMethod, name: str) -> str:
    own = sorted(p.name for p in method.params)
    close = difflib.get_close_matches(name, own, n=1) or difflib.get_close_matches(
        name, sorted(_all_parameter_names()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"no merge method takes a parameter {name!r}{hint} "
            f"(merge method {method.name!r} takes: {', '.join(own) or 'none'})")


def _scalars(setting: Any, key: str):
    """``(key path, value)`` for every scalar of a setting: itself, each gradient point, each filter value."""
    if isinstance(setting, dict):
        yield from _scalars(setting["value"], f"{key}.value")
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            yield from _scalars(item, f"{key}[{i}]")
    else:
        yield key, setting


def _overflow(param: Param, value: Any, dtype: Optional[str]) -> Optional[str]:
    """A number too large for the compute dtype (the recipe's dtype; else float16's range, the narrowest
    an input may have) would overflow when the method scales a tensor by it."""
    if param.kind is not float:
        return None
    limit = torch.finfo(DTYPE_BY_NAME[dtype or "float16"]).max
    if abs(float(value)) <= limit:
        return None
    if dtype:
        return f"{value!r} overflows the compute dtype {dtype} (largest value {limit:g})"
    return (f"{value!r} may overflow the inputs' dtype (largest float16 value {limit:g}); "
            f"set dtype: float32 to use it")


def _parameter_blocks(params: Optional[dict], slices: list[OutputSlice], from_models: bool = False, prefix: str = ""):
    """Every parameters block with its key path as the recipe wrote it (``prefix``: a module's ``modules.NAME.``)."""
    if params is not None:
        yield "parameters", params
    if from_models:  # one slice, its sources are the `models:` entries
        for j, src in enumerate(slices[0].sources):
            yield f"{prefix}models[{j}].parameters", src.parameters
        return
    for i, s in enumerate(slices):
        yield f"{prefix}slices[{i}].parameters", s.parameters
        for j, src in enumerate(s.sources):
            yield f"{prefix}slices[{i}].sources[{j}].parameters", src.parameters


# ---------------------------------------------------------------------------
# Parameter resolution: filters, gradients and precedence
# ---------------------------------------------------------------------------
