"""``genome.kind: both``: a parameter-space merge and a layer path over it and the input models, searched together.

This is the combination of Sakana AI's evolutionary model merge: the data-flow path may take its layers from
the input models *and* from the parameter-space merge of them.

Config: the keys of a parameter-space genome (``merge_method``, ``base_model``, ``parameters``,
``layer_granularity``, ``filters``, ...) plus the ``dataflow`` section of a data-flow genome::

    genome:
      kind: both
      models: [./ft-math, ./ft-code]
      base_model: ./base
      merge_method: ties
      parameters: {weight: {min: 0, max: 1}, density: {min: 0.1, max: 1}}
      dataflow: {max_layers: 8, repeats: 1, scale: {min: 0.5, max: 1.5}}

**Genes**: the parameter genome's (evolve.genome, for the merge method) followed by the data-flow genome's
(evolve.dataflow), whose sources are the merged model (named ``merged``, first) and then ``genome.models``
(the base model is a source only when it is listed there). CMA-ES and NSGA-II see one longer vector;
checkpoints and ``--resume`` are those of any genome.

**Recipe**: two stages, as ``ray-merge multi`` runs them (evolve.stages)::

    - {name: merged, merge_method: ties, base_model: ..., models: [...], ...}     # stage 1: the merge
    - {merge_method: passthrough, slices: [{sources: [{model: merged, layer_range: [0, 4]}]}, ...]}  # stage 2

**Start**: the parameter genome's start, and the merged model's layers in order (include genes 0.75 for the
first repetition of ``merged``, 0.25 elsewhere), so the search starts from the parameter-space merge alone.

**Evaluation**: stage 1 is merged in memory, then stage 2 reads its tensors from memory (the planner's and the
loader's ``in_memory`` models): no model is written to disk. Stage 2 is padded to ``max_layers`` with identity
layers as in a data-flow search; a path that takes no layer of ``merged`` does not merge stage 1 at all.

Refused: ``tokenizer_source`` and ``tokenizer`` (the merged model would need a tokenizer of its own; the
models must share a vocabulary). ``chat_template`` goes into the final stage.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from evolve.config import BOTH_STAGE, GenomeConfig
from evolve.dataflow import DataflowGene, DataflowGenome
from evolve.genome import Gene, Genome, num_layers_of
from ray_merge.errors import UserError
from ray_merge.io.models import ModelRef, index_weights, resolve_model_dir


class BothGenome:
    """Genes <-> two-stage recipe: a parameter-space merge (``self.params``) and a layer path over it and the
    inputs (``self.flow``)."""

    kind = "both"

    def __init__(self, cfg: GenomeConfig, params: Genome, flow: DataflowGenome, source: str = "<config>"):
        self.cfg = cfg
        self.source = source
        self.params = params
        self.flow = flow
        self.method = params.method
        self.split = params.dim
        self.genes: list[Union[Gene, DataflowGene]] = list(params.genes) + list(flow.genes)
        # the report's heat map: one column per output layer (the merge's parameters by layer are as many)
        self.n_groups = flow.n_groups
        self.step = flow.step

    @classmethod
    def from_config(cls, cfg: GenomeConfig, source: str = "<config>") -> "BothGenome":
        if cfg.kind != "both" or cfg.dataflow is None:
            raise ValueError("not a kind: both genome")
        params = Genome.from_config(dataclasses.replace(cfg, kind="parameters", dataflow=None, chat_template=None),
                                    source)
        layers = [num_layers_of(m, source) for m in cfg.models]
        for i, n in enumerate(layers):
            if n != params.num_layers:
                raise UserError(f"{cfg.models[i]} has {n} layers, {cfg.models[0]} {params.num_layers}: a "
                                "parameter-space merge needs models of one depth", source=source,
                                key=f"genome.models[{i}]")
        flow_cfg = dataclasses.replace(cfg, models=[BOTH_STAGE] + list(cfg.models), merge_method="passthrough",
                                       base_model=None, kind="dataflow", searched={}, fixed={}, filters=[],
                                       layer_granularity=0, smooth=False)
        flow = DataflowGenome(flow_cfg, [params.num_layers] + layers, source)
        names = index_weights(resolve_model_dir(ModelRef.parse(cfg.models[0])), cfg.models[0])
        for f in cfg.dataflow.scale_filters:
            if not any(f in name for name in names):
                raise UserError(f"no tensor of {cfg.models[0]} has {f!r} in its name", source=source,
                                key="genome.dataflow.scale_filters")
        return cls(cfg, params, flow, source)

    # -- vectors ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.genes)

    def _parts(self, x: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genotype has shape {x.shape}, the genome {self.dim} genes")
        return x[:self.split], x[self.split:]

    def initial(self, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """The parameter genome's start and the merged model's layers (or, with ``rng``, uniform random)."""
        return np.concatenate([self.params.initial(rng), self.flow.initial(rng)])

    def values(self, x: Sequence[float]) -> dict:
        xp, xf = self._parts(x)
        return {**self.params.values(xp), **self.flow.values(xf)}

    def gene_label(self, g, short: bool = True) -> str:
        return (self.flow if isinstance(g, DataflowGene) else self.params).gene_label(g, short)

    # -- recipes ---------------------------------------------------------------------------------------
    def to_recipe(self, x: Sequence[float]) -> list[dict]:
        """The two-stage recipe of genotype ``x``: ``[{name: merged, ...the merge}, {...the layer path}]``."""
        xp, xf = self._parts(x)
        return [{"name": BOTH_STAGE, **self.params.to_recipe(xp)}, self.flow.to_recipe(xf)]

    def for_evaluator(self, recipe: Union[list, dict]) -> Union[list, dict]:
        """The layer path padded to ``max_layers`` (evolve.dataflow); a one-model recipe (an input model) too."""
        if isinstance(recipe, list):
            return list(recipe[:-1]) + [self.flow.for_evaluator(recipe[-1])]
        return self.flow.for_evaluator(recipe)

    def eval_recipe(self, x: Sequence[float]) -> Union[list, dict]:
        return self.for_evaluator(self.to_recipe(x))

    # -- report ----------------------------------------------------------------------------------------
    def layer_table(self, x: Sequence[float]) -> tuple[list[str], np.ndarray]:
        """The merge's parameters by layer (rows named ``merged: ...``), then the layer path's table."""
        xp, xf = self._parts(x)
        p_labels, p_table = self.params.layer_table(xp)
        f_labels, f_table = self.flow.layer_table(xf)
        width = max(p_table.shape[1], f_table.shape[1])
        pad = lambda t: np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=np.nan)  # noqa: E731
        return ([f"{BOTH_STAGE}: {label}" for label in p_labels] + f_labels,
                np.concatenate([pad(p_table), pad(f_table)]))

    def describe(self) -> str:
        return (f"genome: both: {self.dim} genes = stage 1, the merge ({BOTH_STAGE!r}):\n  "
                + self.params.describe().replace("\n", "\n  ")
                + "\nand stage 2, the layer path over it and the inputs:\n  " + self.flow.describe())
