"""The genome: a vector in [0, 1]^n <-> a merge recipe.

Which parameters are searched comes from the merge method's registry entry (ray_merge.methods: ``Param``
specs), not from a table here:

- searched by default: for mergekit-evolve's methods, the genes it defines (``MERGEKIT_GENES``: linear and
  task_arithmetic their weights, ties and dare_ties weight and density, slerp ``t``); for any other method,
  every float parameter that is per-model, or that the method requires;
- ``genome.parameters.NAME: {min, max, init}`` searches any float or integer parameter within those bounds;
- ``genome.parameters.NAME: VALUE`` fixes a parameter (it is written into every recipe, not searched).

One gene per (searched parameter, layer group, model — for per-model parameters —, filter set), where the
layer groups come from ``layer_granularity`` and the filter sets are ``filters`` plus "everything else", as
in mergekit-evolve. Per-model parameters that only non-base models take (``Param.non_base``) get no gene for
the base model. Each gene is a coordinate in [0, 1] that maps linearly onto the parameter's bounds, so
CMA-ES's ``sigma0`` is in units of each parameter's range.

Default bounds: ``weight`` [0, 1] ([-1, 1] with ``allow_negative_weights``: mergekit-evolve takes the absolute
value of weights unless negative ones are allowed, so without it they are never negative); any other parameter
[0, 1], or [0, 2 x default] when its default is above 1; each within the range the method accepts. Initial
value: ``init``, else the method's default, else 1/N for per-model parameters (N models with a gene), else
the middle of the bounds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from evolve.config import GenomeConfig
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef, read_config, resolve_model_dir
from ray_merge.methods import get_method
from ray_merge.planner.architecture import get_config_value, layer_count_key


# the parameters mergekit-evolve searches for the methods it supports (its genome's METHOD_PARAM_MAPS)
MERGEKIT_GENES = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
                  "dare_ties": ("weight", "density"), "slerp": ("t",)}


@dataclass(frozen=True)
class SearchedParam:
    name: str
    per_model: bool
    is_int: bool
    lo: float
    hi: float
    init: float
    model_slots: tuple[int, ...]  # indexes into GenomeConfig.models that get a gene (per-model params)

    def value(self, u: float) -> float:
        v = self.lo + float(np.clip(u, 0.0, 1.0)) * (self.hi - self.lo)
        return int(round(v)) if self.is_int else v

    def coord(self, v: float) -> float:
        return float(np.clip((float(v) - self.lo) / (self.hi - self.lo), 0.0, 1.0))


@dataclass(frozen=True)
class Gene:
    param: str
    group: int
    model: Optional[int]  # index into GenomeConfig.models, None for a global parameter
    fset: int  # index into filters; len(filters) is "everything else"


def num_layers_of(model: str, source: str = "<config>") -> int:
    path = resolve_model_dir(ModelRef.parse(model), weights=False)
    config = read_config(path, model)
    key = layer_count_key(config)
    if key is None:
        raise UserError(f"model {model}: config.json says nothing of its layer count", source=source,
                        key="genome.models[0]")
    return int(get_config_value(config, key))


class Genome:
    """A parameter-space genome (``genome.kind: parameters``; evolve.dataflow has the layer-path one)."""

    kind = "parameters"

    def __init__(self, cfg: GenomeConfig, num_layers: int, source: str = "<config>"):
        self.cfg = cfg
        self.source = source
        self.num_layers = num_layers
        self.method = get_method(cfg.merge_method)

        def err(key: str, msg: str) -> UserError:
            return UserError(msg, source=source, key=key)

        gran = cfg.layer_granularity
        if gran > 0 and num_layers % gran:
            raise err("genome.layer_granularity", f"{gran} does not divide the models' {num_layers} layers")
        self.step = gran if gran > 0 else num_layers
        self.n_groups = num_layers // self.step
        self.sets: list[Optional[str]] = list(cfg.filters) + [None]
        n_max = self.method.max_inputs
        n_inputs = len(set(cfg.models) | ({cfg.base_model} if cfg.base_model else set()))
        if n_max is not None and n_inputs > n_max:
            raise err("genome.models", f"merge method {self.method.name!r} takes at most {n_max} models "
                                       f"(base included); the genome has {n_inputs}")

        params: list[SearchedParam] = []
        for p in self.method.params:
            if p.name in cfg.fixed:
                continue
            bounds = cfg.searched.get(p.name)
            if bounds is None:
                default_genes = MERGEKIT_GENES.get(self.method.name)
                if default_genes is not None and p.name not in default_genes:
                    continue
                if p.kind is not float or not (p.per_model or p.required):
                    continue
            elif p.kind not in (float, int):
                raise err(f"genome.parameters.{p.name}", "only numeric parameters can be searched")
            slots: tuple[int, ...] = ()
            if p.per_model:
                slots = tuple(i for i, m in enumerate(cfg.models)
                              if not (p.non_base and cfg.base_model is not None and m == cfg.base_model))
                if not slots:
                    continue
            if bounds is not None:
                lo, hi, init = bounds.lo, bounds.hi, bounds.init
            else:
                lo, hi, init = _default_bounds(p, cfg.allow_negative_weights)
            if init is None:
                d = p.default
                if isinstance(d, (int, float)) and not isinstance(d, bool) and lo <= d <= hi:
                    init = float(d)
                elif p.per_model:
                    init = float(np.clip(1.0 / len(slots), lo, hi))
                else:
                    init = (lo + hi) / 2
            params.append(SearchedParam(p.name, p.per_model, p.kind is int, float(lo), float(hi), float(init),
                                        slots))
        if not params:
            raise err("genome.parameters", f"merge method {self.method.name!r} has no parameter searched by "
                                            "default; give the ones to search with min and max")
        self.params = params
        self.genes: list[Gene] = []
        for sp in params:
            for g in range(self.n_groups):
                for m in (sp.model_slots if sp.per_model else (None,)):
                    for s in range(len(self.sets)):
                        self.genes.append(Gene(sp.name, g, m, s))
        self._index = {(g.param, g.group, g.model, g.fset): i for i, g in enumerate(self.genes)}
        self._param = {sp.name: sp for sp in params}

    @classmethod
    def from_config(cls, cfg: GenomeConfig, source: str = "<config>") -> "Genome":
        named = [(f"genome.models[{i}]", m) for i, m in enumerate(cfg.models)]
        if cfg.base_model is not None:
            named.append(("genome.base_model", cfg.base_model))
        for key, m in named:
            try:
                resolve_model_dir(ModelRef.parse(m), weights=False)
            except UserError as e:
                raise UserError(str(e), source=source, key=key)
        return cls(cfg, num_layers_of(cfg.models[0], source), source)

    # -- vectors ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.genes)

    def initial(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """The starting point in [0, 1]^n: each parameter's initial value, or uniform random."""
        if rng is not None:
            return rng.uniform(0.0, 1.0, self.dim)
        return np.array([self._param[g.param].coord(self._param[g.param].init) for g in self.genes])

    def values(self, x: Sequence[float]) -> dict[Gene, float]:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genotype has shape {x.shape}, the genome {self.dim} genes")
        return {g: self._param[g.param].value(u) for g, u in zip(self.genes, x)}

    def gene_label(self, g: Gene, short: bool = True) -> str:
        parts = [g.param]
        if g.model is not None:
            parts.append(_short(self.cfg.models[g.model]) if short else self.cfg.models[g.model])
        if len(self.sets) > 1:
            parts.append(self.sets[g.fset] or "other")
        if self.n_groups > 1:
            parts.append(f"layers {g.group * self.step}-{(g.group + 1) * self.step - 1}")
        return " · ".join(parts)

    # -- recipes ---------------------------------------------------------------------------------------
    def to_recipe(self, x: Sequence[float]) -> dict:
        """The mergekit-format recipe (a plain dict) for genotype ``x``."""
        vals = self.values(x)
        cfg = self.cfg

        def setting(param: str, groups: Sequence[int], model: Optional[int]) -> Any:
            """Scalar, gradient (one anchor per group) or filter list of either."""
            per_set = []
            for s in range(len(self.sets)):
                anchors = [vals[Gene(param, g, model, s)] for g in groups]
                per_set.append(anchors[0] if len(anchors) == 1 else anchors)
            if len(per_set) == 1:
                return per_set[0]
            return [({"filter": f, "value": v} if f is not None else {"value": v})
                    for f, v in zip(self.sets, per_set)]

        per_model = [sp for sp in self.params if sp.per_model]
        global_ = [sp for sp in self.params if not sp.per_model]
        recipe: dict[str, Any] = {"merge_method": self.method.name}
        if cfg.base_model is not None:
            recipe["base_model"] = cfg.base_model
        top = dict(cfg.fixed)
        use_models = self.n_groups == 1 or cfg.smooth
        if use_models:
            groups = list(range(self.n_groups))
            models = []
            for i, m in enumerate(cfg.models):
                params = {sp.name: setting(sp.name, groups, i) for sp in per_model if i in sp.model_slots}
                models.append({"model": m, "parameters": params} if params else {"model": m})
            if cfg.base_model is not None and cfg.base_model not in cfg.models:
                models.append({"model": cfg.base_model})
            recipe["models"] = models
            for sp in global_:
                top[sp.name] = setting(sp.name, groups, None)
        else:
            slices = []
            for g in range(self.n_groups):
                lr = [g * self.step, (g + 1) * self.step]
                sources = []
                for i, m in enumerate(cfg.models):
                    params = {sp.name: setting(sp.name, [g], i) for sp in per_model if i in sp.model_slots}
                    src: dict[str, Any] = {"model": m, "layer_range": lr}
                    if params:
                        src["parameters"] = params
                    sources.append(src)
                if cfg.base_model is not None and cfg.base_model not in cfg.models:
                    sources.append({"model": cfg.base_model, "layer_range": lr})
                sl: dict[str, Any] = {"sources": sources}
                if global_:
                    sl["parameters"] = {sp.name: setting(sp.name, [g], None) for sp in global_}
                slices.append(sl)
            recipe["slices"] = slices
        if top:
            recipe["parameters"] = top
        for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
            v = getattr(cfg, key)
            if v is not None:
                recipe[key] = v
        return _plain(recipe)

    def for_evaluator(self, recipe: dict) -> dict:
        """The recipe the evaluators build for ``recipe``: itself (every candidate has the inputs' layers)."""
        return recipe

    def eval_recipe(self, x: Sequence[float]) -> dict:
        return self.for_evaluator(self.to_recipe(x))

    def from_recipe(self, recipe: dict) -> np.ndarray:
        """The genotype a recipe written by ``to_recipe`` came from (values clipped into the bounds)."""
        x = np.zeros(self.dim)

        def put(param: str, groups: Sequence[int], model: Optional[int], setting: Any) -> None:
            sets = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else None
            if sets is None:
                sets = [{"value": setting}]
            if len(sets) != len(self.sets):
                raise ValueError(f"{param}: {len(sets)} filter sets, the genome has {len(self.sets)}")
            for s, entry in enumerate(sets):
                v = entry["value"]
                anchors = v if isinstance(v, list) else [v]
                if len(anchors) != len(groups):
                    raise ValueError(f"{param}: {len(anchors)} values, the genome has {len(groups)} layer groups")
                for g, a in zip(groups, anchors):
                    x[self._index[(param, g, model, s)]] = self._param[param].coord(a)

        top = recipe.get("parameters") or {}
        if "models" in recipe:
            groups = list(range(self.n_groups))
            by_model = {m["model"]: m.get("parameters") or {} for m in recipe["models"]}
            for sp in self.params:
                if sp.per_model:
                    for i in sp.model_slots:
                        put(sp.name, groups, i, by_model[self.cfg.models[i]][sp.name])
                else:
                    put(sp.name, groups, None, top[sp.name])
        else:
            for g, sl in enumerate(recipe["slices"]):
                by_model = {s["model"]: s.get("parameters") or {} for s in sl["sources"]}
                for sp in self.params:
                    if sp.per_model:
                        for i in sp.model_slots:
                            put(sp.name, [g], i, by_model[self.cfg.models[i]][sp.name])
                    else:
                        put(sp.name, [g], None, sl["parameters"][sp.name])
        return x

    def layer_table(self, x: Sequence[float]) -> tuple[list[str], np.ndarray]:
        """(row labels, values[row, layer]): every searched value of ``x`` at every layer, for the heat map.

        Smooth genomes interpolate between the groups' anchors as the planner does.
        """
        vals = self.values(x)
        rows: dict[tuple, list[float]] = {}
        labels: dict[tuple, str] = {}
        for sp in self.params:
            for m in (sp.model_slots if sp.per_model else (None,)):
                for s in range(len(self.sets)):
                    key = (sp.name, m, s)
                    anchors = [vals[Gene(sp.name, g, m, s)] for g in range(self.n_groups)]
                    per_layer = []
                    for layer in range(self.num_layers):
                        if self.cfg.smooth and self.n_groups > 1:
                            t = layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0
                            pos = t * (self.n_groups - 1)
                            i0 = int(pos)
                            i1 = min(self.n_groups - 1, i0 + 1)
                            per_layer.append((1 - (pos - i0)) * anchors[i0] + (pos - i0) * anchors[i1])
                        else:
                            per_layer.append(anchors[layer // self.step])
                    rows[key] = per_layer
                    parts = [sp.name] + ([_short(self.cfg.models[m])] if m is not None else [])
                    if len(self.sets) > 1:
                        parts.append(self.sets[s] or "other")
                    labels[key] = " · ".join(parts)
        keys = list(rows)
        return [labels[k] for k in keys], np.array([rows[k] for k in keys])

    def describe(self) -> str:
        lines = [f"genome: {self.method.name}, {len(self.cfg.models)} model(s), {self.num_layers} layers in "
                 f"{self.n_groups} group(s), {len(self.sets)} filter set(s): {self.dim} genes"]
        for sp in self.params:
            scope = f"per model ({len(sp.model_slots)})" if sp.per_model else "global"
            lines.append(f"  {sp.name:<12} {scope:<15} [{sp.lo:g}, {sp.hi:g}] init {sp.init:g}")
        if self.cfg.fixed:
            lines.append("  fixed: " + ", ".join(f"{k}={v!r}" for k, v in self.cfg.fixed.items()))
        return "\n".join(lines)


def _default_bounds(p, allow_negative: bool) -> tuple[float, float, Optional[float]]:
    """[0, 1] (weights: [-1, 1] with allow_negative_weights; a default above 1: [0, 2 x default]), within the
    range the method accepts (``Param.min`` / ``max``)."""
    if p.name == "weight":
        lo, hi = (-1.0 if allow_negative else 0.0), 1.0
    else:
        d = p.default
        big = isinstance(d, (int, float)) and not isinstance(d, bool) and d > 1
        lo, hi = 0.0, (2.0 * float(d) if big else 1.0)
    if p.min is not None:
        lo = max(lo, float(p.min))
    if p.max is not None:
        hi = min(hi, float(p.max))
    return lo, hi, None


def _short(model: str) -> str:
    return os.path.basename(model.rstrip("/")) or model


def _plain(v: Any) -> Any:
    """numpy scalars -> Python scalars, recursively (YAML and JSON friendly)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v
