"""Data-flow search: which layers of which models form the output stack, and how much each one writes.

The idea is the data-flow space of Sakana AI's evolutionary model merge: a merged model is a path through the
input models' layers. ``genome.kind: dataflow`` searches such paths with CMA-ES; the result is a runnable
mergekit-format ``slices:`` recipe (``merge_method: passthrough``).

Config (``genome`` section)::

    genome:
      kind: dataflow
      models: [./ft-math, ./ft-code]     # the layers' sources (a base model is a source like any other)
      dataflow:
        max_layers: 48                   # layers of the output at most (default: twice the deepest model's)
        repeats: 2                       # times each model's layers appear among the candidate layers
        scale: {min: 0.5, max: 1.5, init: 1.0}   # a searched scale per candidate layer, or a number: fixed
        scale_filters: [o_proj, down_proj]       # the tensors a scale multiplies (see below)

**Candidate layers.** The candidates are the models' layers in order, model after model, the whole sequence
repeated ``repeats`` times: with models A (L_A layers) and B, repeats 2, the sequence is A0 .. A(L_A-1),
B0 .. B(L_B-1), A0 .. A(L_A-1), B0 .. B(L_B-1) (T = repeats x sum of L candidates).

**Genes** (each in [0, 1], as CMA-ES searches them): one *include* gene per candidate, then — when the scale
is searched — one *scale* gene per candidate, mapped linearly onto ``[min, max]`` (rounded to 4 decimals).

**Decoding** (deterministic): the output stack is the candidates whose include gene is above 0.5, in sequence
order. When more than ``max_layers`` are included, the ``max_layers`` with the highest include genes are kept
(still in sequence order; ties go to the earlier candidate); when none is, the candidate with the highest
include gene alone. Each output layer is (model, layer, scale).

**The recipe.** One slice per run of output layers that come from the same model, from consecutive layers,
with the same scale: ``{sources: [{model, layer_range: [first, last + 1), parameters: {scale: ...}}]}``. As
in any passthrough recipe, the embeddings come from the first slice's model and the final norm and lm_head
from the last slice's (the planner's rule for tensors outside the layers); the output's layer count (and
every per-layer config field) is rewritten by the planner.

**Scale.** A layer's scale multiplies the tensors named by ``scale_filters`` (substrings of the tensor names;
default ``o_proj`` and ``down_proj``: in a Llama-like layer these are the two that write into the residual
stream, so the scale is how much the layer adds to it — the role of Sakana's scaling matrix). A scale of 1
writes no parameters. In the recipe: ``scale: [{filter: o_proj, value: s}, {filter: down_proj, value: s},
{value: 1.0}]``. For GPT-2-like models use ``[c_proj]``.

**Evaluating paths of different depths in one model.** Each evaluator instantiates its model once (and vLLM
its engine once), so every candidate it scores must have the same layers. A scale of 0 on the residual
writers makes a layer an exact identity (the layer adds zeros to the residual stream: its attention and MLP
outputs are multiplied by zero weights). So the evaluators build each candidate *padded* to ``max_layers``
with such identity layers, taken from the last slice's model (which keeps the final norm and lm_head the
path's own) and appended after the path: the scores are those of the unpadded recipe, which is the one
recorded in the history and written to ``best_config.yml``. The input models are scored padded the same way.
This is why ``max_layers`` must be at least every input model's layer count.

**Initial point.** The first model's layers in order (include genes 0.75 for the first repetition of the
first model, 0.25 elsewhere) with the scale's ``init`` (default 1): the search starts from the first input
model. ``search.random_init`` starts from a random point instead.

``kind: both`` (evolve.both) uses this genome with the parameter-space merge of the inputs as one more source
(named ``merged``), in a two-stage recipe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from evolve.config import GenomeConfig
from evolve.genome import num_layers_of
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef, index_weights, resolve_model_dir
from ray_merge.methods import get_method

INCLUDED, EXCLUDED = 0.75, 0.25  # the initial include genes: the first model's layers, the rest


@dataclass(frozen=True)
class Slot:
    """A candidate layer: layer ``layer`` of model ``model`` (index into genome.models), in repetition
    ``repeat``."""
    repeat: int
    model: int
    layer: int


@dataclass(frozen=True)
class DataflowGene:
    kind: str  # "include" or "scale"
    slot: int  # index into DataflowGenome.slots


@dataclass(frozen=True)
class PathLayer:
    model: int
    layer: int
    scale: float


class DataflowGenome:
    """Genes <-> layer path <-> ``slices:`` recipe (the module docstring describes the encoding)."""

    kind = "dataflow"

    def __init__(self, cfg: GenomeConfig, layers: Sequence[int], source: str = "<config>"):
        if cfg.dataflow is None:
            raise ValueError("not a dataflow genome")
        self.cfg = cfg
        self.df = cfg.dataflow
        self.source = source
        self.layers = list(layers)  # each model's layer count
        self.method = get_method("passthrough")
        deepest = max(self.layers)
        self.max_layers = self.df.max_layers or 2 * deepest
        if self.max_layers < deepest:
            raise UserError(f"{self.max_layers} is below the {deepest} layers of an input model (the evaluators "
                            "score every path padded to max_layers, the input models too)", source=source,
                            key="genome.dataflow.max_layers")
        self.slots = [Slot(r, m, i) for r in range(self.df.repeats) for m, n in enumerate(self.layers)
                      for i in range(n)]
        b = self.df.scale
        self.scale_searched = b.hi > b.lo
        self.genes = [DataflowGene("include", t) for t in range(len(self.slots))]
        if self.scale_searched:
            self.genes += [DataflowGene("scale", t) for t in range(len(self.slots))]
        # the report's heat map: one column per output position
        self.n_groups = self.max_layers
        self.step = 1

    @classmethod
    def from_config(cls, cfg: GenomeConfig, source: str = "<config>") -> "DataflowGenome":
        for i, m in enumerate(cfg.models):
            try:
                resolve_model_dir(ModelRef.parse(m), weights=False)
            except UserError as e:
                raise UserError(str(e), source=source, key=f"genome.models[{i}]")
        genome = cls(cfg, [num_layers_of(m, source) for m in cfg.models], source)
        names = index_weights(resolve_model_dir(ModelRef.parse(cfg.models[0])), cfg.models[0])
        for f in cfg.dataflow.scale_filters:
            if not any(f in name for name in names):
                raise UserError(f"no tensor of {cfg.models[0]} has {f!r} in its name", source=source,
                                key="genome.dataflow.scale_filters")
        return genome

    # -- vectors ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.genes)

    def initial(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """The first model's layers in order at the initial scale (or, with ``rng``, uniform random)."""
        if rng is not None:
            return rng.uniform(0.0, 1.0, self.dim)
        b = self.df.scale
        scale0 = (b.init - b.lo) / (b.hi - b.lo) if self.scale_searched else 0.0
        x = []
        for g in self.genes:
            s = self.slots[g.slot]
            if g.kind == "include":
                x.append(INCLUDED if s.repeat == 0 and s.model == 0 else EXCLUDED)
            else:
                x.append(scale0)
        return np.array(x, dtype=float)

    def _check(self, x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genotype has shape {x.shape}, the genome {self.dim} genes")
        return x

    def scale_of(self, u: float) -> float:
        b = self.df.scale
        return round(b.lo + float(np.clip(u, 0.0, 1.0)) * (b.hi - b.lo), 4)

    def values(self, x: Sequence[float]) -> dict[DataflowGene, float]:
        """Each gene's value: include genes as they are (included above 0.5), scale genes as scales."""
        x = self._check(x)
        return {g: (float(u) if g.kind == "include" else self.scale_of(u)) for g, u in zip(self.genes, x)}

    def gene_label(self, g: DataflowGene, short: bool = True) -> str:
        s = self.slots[g.slot]
        model = _short(self.cfg.models[s.model]) if short else self.cfg.models[s.model]
        parts = [g.kind] + ([f"r{s.repeat}"] if self.df.repeats > 1 else []) + [model, f"layer {s.layer}"]
        return " · ".join(parts)

    # -- decoding --------------------------------------------------------------------------------------
    def path(self, x: Sequence[float]) -> list[PathLayer]:
        """The output stack of genotype ``x``: (model, layer, scale) per output layer, bottom first."""
        x = self._check(x)
        n = len(self.slots)
        include = x[:n]
        chosen = [t for t in range(n) if include[t] > 0.5]
        if not chosen:
            chosen = [int(np.argmax(include))]
        if len(chosen) > self.max_layers:  # keep the most strongly included, in sequence order
            chosen = sorted(sorted(chosen, key=lambda t: -include[t])[:self.max_layers])
        out = []
        for t in chosen:
            s = self.slots[t]
            scale = self.scale_of(x[n + t]) if self.scale_searched else float(self.df.scale.lo)
            out.append(PathLayer(s.model, s.layer, scale))
        return out

    def _scale_param(self, scale: float) -> dict:
        return {"scale": [{"filter": f, "value": float(scale)} for f in self.df.scale_filters] + [{"value": 1.0}]}

    def _source(self, model: int, start: int, end: int, scale: float) -> dict:
        src: dict[str, Any] = {"model": self.cfg.models[model], "layer_range": [start, end]}
        if scale != 1.0:
            src["parameters"] = self._scale_param(scale)
        return src

    def path_recipe(self, path: Sequence[PathLayer]) -> dict:
        """The ``slices:`` recipe of a path: one slice per run of consecutive layers of one model at one scale."""
        runs: list[list[PathLayer]] = []
        for p in path:
            last = runs[-1][-1] if runs else None
            if last is not None and (p.model, p.layer, p.scale) == (last.model, last.layer + 1, last.scale):
                runs[-1].append(p)
            else:
                runs.append([p])
        slices = [{"sources": [self._source(r[0].model, r[0].layer, r[-1].layer + 1, r[0].scale)]} for r in runs]
        recipe: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
            v = getattr(self.cfg, key)
            if v is not None:
                recipe[key] = v
        return recipe

    def to_recipe(self, x: Sequence[float]) -> dict:
        """The runnable recipe of genotype ``x`` (what the history and ``best_config.yml`` hold)."""
        return self.path_recipe(self.path(x))

    # -- what the evaluators build ---------------------------------------------------------------------
    def for_evaluator(self, recipe: dict) -> dict:
        """``recipe`` padded to ``max_layers`` layers with identity layers (a scale of 0 on the residual
        writers), from its last slice's model; a ``models:`` recipe (an input model) becomes one slice."""
        recipe = dict(recipe)
        if "models" in recipe:
            (entry,) = recipe.pop("models")
            model = entry["model"] if isinstance(entry, dict) else entry
            recipe["slices"] = [{"sources": [{"model": model, "layer_range": [0, self._layers_of(model)]}]}]
        slices = list(recipe["slices"])
        depth = sum(sl["sources"][0]["layer_range"][1] - sl["sources"][0]["layer_range"][0] for sl in slices)
        model = slices[-1]["sources"][0]["model"]
        n_model = self._layers_of(model)
        pad = self.max_layers - depth
        while pad > 0:
            k = min(pad, n_model)
            slices.append({"sources": [{"model": model, "layer_range": [0, k],
                                        "parameters": self._scale_param(0.0)}]})
            pad -= k
        recipe["slices"] = slices
        return recipe

    def eval_recipe(self, x: Sequence[float]) -> dict:
        return self.for_evaluator(self.to_recipe(x))

    def _layers_of(self, model: str) -> int:
        if model in self.cfg.models:
            return self.layers[self.cfg.models.index(model)]
        return num_layers_of(model, self.source)

    # -- report ----------------------------------------------------------------------------------------
    def layer_table(self, x: Sequence[float]) -> tuple[list[str], np.ndarray]:
        """(row labels, values[row, output layer]): per model, the source layer of each output layer it
        gives (NaN elsewhere), and the scale of each output layer; NaN past the path."""
        path = self.path(x)
        table = np.full((len(self.cfg.models) + 1, self.max_layers), np.nan)
        for k, p in enumerate(path):
            table[p.model, k] = p.layer
            table[-1, k] = p.scale
        labels = [f"layer of {_short(m)}" for m in self.cfg.models] + ["scale"]
        return labels, table

    def describe(self) -> str:
        b = self.df.scale
        scale = (f"scale [{b.lo:g}, {b.hi:g}] init {b.init:g}" if self.scale_searched else f"scale {b.lo:g}") + \
            f" on {', '.join(self.df.scale_filters)}"
        models = ", ".join(f"{_short(m)} ({n})" for m, n in zip(self.cfg.models, self.layers))
        return (f"genome: dataflow (layer paths) over {models} layers, repeated {self.df.repeats}x: "
                f"{len(self.slots)} candidate layers, at most {self.max_layers} output layers, {scale}: "
                f"{self.dim} genes")


def _short(model: str) -> str:
    return os.path.basename(model.rstrip("/")) or model
