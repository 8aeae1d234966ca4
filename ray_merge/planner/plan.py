"""Planning: recipe + model metadata -> every output tensor with its inputs and parameters.

No tensor data is read, except the few non-float buffers (position ids, masks), which are
compared across the inputs: copied when identical, never merged. The plan is a plain
picklable value: the in-process executor and the Ray workers run the same plan, cut into
output shards.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ray_merge.dtypes import DTYPE_BY_NAME, dtype_name, itemsize
from ray_merge.errors import UserError
from ray_merge.io.models import (
    ModelRef,
    TensorMeta,
    plan_model,
    same_data,
)
from ray_merge.io.quantized import unquantized_config
from ray_merge.methods import MergeMethod, get_method
from ray_merge.options import DEFAULT_SHARD_BYTES
from ray_merge.planner.architecture import (
    Layout,
    infer_layout,
    output_layers,
    packed_dim,
)
from ray_merge.planner.layer_config import check_same_layers, layer_values, stack_layer_fields
from ray_merge.planner.modules import plan_modules
from ray_merge.planner.vocab import (
    RowRemap,
    TokenizerPlan,
    check_vocab_widths,
    is_vocab_tensor_name,
    set_config_vocab_size,
    shape_mismatch_hint,
    truncated,
    vocab_planner,
    warn_if_no_tokenizer,
)
from ray_merge.recipe.params import _MISSING, resolve
from ray_merge.recipe.schema import OutputSlice, Recipe, SliceSource

log = logging.getLogger("ray_merge")


@dataclass(frozen=True)
class InputModel:
    ref: str  # as written in the recipe
    path: str  # local directory


@dataclass(frozen=True)
class TensorInput:
    model: int  # index into Plan.models
    tensor: str
    file: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class PackedBlock:
    """One output block of a packed tensor: merged from block ``blocks[k]`` of input ``inputs[k]`` (indices
    into the tensor's inputs), with the parameters of the output layer it belongs to."""

    inputs: tuple[int, ...]
    blocks: tuple[int, ...]
    base_index: Optional[int]  # into this block's inputs
    params: dict
    model_params: tuple[dict, ...]


@dataclass(frozen=True)
class Packed:
    """A tensor outside the layers that packs one block per layer along ``dim`` (Gemma 3n / Gemma 4's
    per-layer embeddings): output block j (``width`` wide) belongs to output layer j and is merged from the
    blocks of the source layers that output layer j comes from."""

    dim: int
    width: int
    blocks: tuple[PackedBlock, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its inputs, method and resolved parameters (immutable once planned)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    inputs: list[TensorInput]
    base_index: Optional[int]
    compute_dtype: Optional[str]  # the recipe's dtype, else the inputs' promoted one; None: non-float buffer
    params: dict
    model_params: list[dict]
    method: str
    working_bytes: int  # peak memory to compute it (inputs + temporaries + output)
    shard: int = -1
    row_remap: Optional[RowRemap] = None  # rows remapped to the output vocabulary
    packed: Optional[Packed] = None  # restacked block by block (then params and base_index are per block)

    @property
    def out_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * itemsize(self.out_dtype)

    @property
    def in_bytes(self) -> int:
        total = 0
        for i in self.inputs:
            n = 1
            for d in i.shape:
                n *= d
            total += n * itemsize(i.dtype)
        return total


@dataclass(frozen=True)
class Shard:
    index: int
    filename: str
    tensors: list[str]
    nbytes: int


@dataclass
class Plan:
    recipe: Recipe
    method: str
    models: list[InputModel]
    tensors: list[PlannedTensor]
    shards: list[Shard]
    out_config: dict
    donor: int  # index of the model whose config / tokenizer / extra files are used
    seed: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    tokenizer: Optional[TokenizerPlan] = None  # tokenizer files / chat template to write

    def tensor(self, name: str) -> PlannedTensor:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

    def shard_tensors(self, shard: Shard) -> list[PlannedTensor]:
        return [self._by_name[n] for n in shard.tensors]

    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes for t in self.tensors)

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def peak_working_bytes(self) -> int:
        return max((t.working_bytes for t in self.tensors), default=0)

    @property
    def fingerprint(self) -> str:
        """Identifies the plan's output bytes: recipe, inputs, seed and layout."""
        h = hashlib.sha256()
        h.update(self.recipe.hash.encode())
        h.update(repr(self.seed).encode())
        for m in self.models:
            h.update(m.path.encode())
        for t in self.tensors:
            h.update(f"{t.name}|{t.shape}|{t.out_dtype}|{t.shard}".encode())
        return h.hexdigest()


@dataclass
class _ModelMeta:
    ref: ModelRef
    path: str
    config: dict
    index: dict[str, TensorMeta]
    layout: Layout


class Planner:
    def __init__(self, recipe: Recipe, *, out_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 allow_crimes: bool = False, seed: Optional[int] = None, trust_remote_code: bool = False,
                 unsafe_truncate_embeddings: bool = False,
                 in_memory: Optional[dict[str, tuple[str, dict, dict[str, TensorMeta]]]] = None):
        self.recipe = recipe
        self.method: MergeMethod = get_method(recipe.merge_method)
        # models that exist only in memory (an earlier stage of a multi-stage candidate, merged by the caller):
        # recipe name -> (directory of its tokenizer and extra files, config, tensor index); the caller's loader
        # supplies their tensors
        self.in_memory = in_memory or {}
        self.out_shard_bytes = out_shard_bytes
        self.allow_crimes = allow_crimes
        self.seed = seed
        self.trust_remote_code = trust_remote_code  # for the tokenizers a vocabulary merge loads
        self.unsafe_truncate_embeddings = unsafe_truncate_embeddings  # no tokenizer setting: keep the common rows
        self._truncated_rows: Optional[int] = None  # the rows truncated vocabulary tensors keep
        self._meta: dict[ModelRef, _ModelMeta] = {}
        self._order: list[ModelRef] = []
        self.vocab = None  # vocab.VocabPlanner when the recipe sets tokenizer / chat_template
        self._values: dict[ModelRef, dict[str, list]] = {}  # each model's per-layer config values

    # -- model metadata ---------------------------------------------------
    def meta(self, ref: ModelRef) -> _ModelMeta:
        if ref not in self._meta:
            given = self.in_memory.get(str(ref))  # else from disk (a hub model: metadata only, no weights)
            path, config, index = given if given is not None else plan_model(ref)
            names = sorted(index, key=_natural_key)
            layout = infer_layout(names, config, str(ref))
            self._meta[ref] = _ModelMeta(ref, path, config, index, layout)
            self._order.append(ref)
        return self._meta[ref]

    def model_index(self, ref: ModelRef) -> int:
        self.meta(ref)
        return self._order.index(ref)

    # -- planning ---------------------------------------------------------
    def plan(self) -> Plan:
        recipe = self.recipe
        for ref in recipe.referenced_models():
            self.meta(ref)
        slices = self._normalized_slices() if not recipe.modules else []
        self._check_architectures()

        first_source = slices[0] if slices else next(iter(recipe.modules.values())).slices[0]
        donor_ref = recipe.base_model or first_source.sources[0].model
        donor = self.meta(donor_ref)

        self.vocab = vocab_planner(recipe, [(str(r), self._meta[r].path, self._meta[r].config) for r in self._order],
                                   self._order.index(donor_ref), self.trust_remote_code)
        if self.vocab is None:
            warn_if_no_tokenizer(str(donor_ref), donor.path)
        elif self.unsafe_truncate_embeddings and self.vocab.remaps:
            log.warning("--unsafe-truncate-embeddings has no effect: the recipe's tokenizer settings align the "
                        "vocabularies (as in mergekit)")
        if recipe.modules:  # each module planned with its own slices (planner/modules.py)
            tensors, out_config = plan_modules(self, donor)
            out_config = self._out_config(donor, [], out_config)
        else:
            tensors, stack = self._plan_slices(slices, donor)
            out_config = self._out_config(donor, stack)
        if self.vocab is not None:
            self.vocab.update_config(out_config)
        if self._truncated_rows is not None:  # mergekit keeps the donor's vocab_size, which then does not load
            set_config_vocab_size(out_config, self._truncated_rows)
        tensors, shards = self._shard(tensors)
        models = [InputModel(str(r), self._meta[r].path) for r in self._order]
        return Plan(
            recipe=recipe,
            method=self.method.name,
            models=models,
            tensors=tensors,
            shards=shards,
            out_config=out_config,
            donor=self._order.index(donor_ref),
            seed=self.seed,
            tokenizer=self.vocab.plan if self.vocab is not None else None,
        )

    def _plan_slices(self, slices: list[OutputSlice], donor: _ModelMeta
                     ) -> tuple[list[PlannedTensor], list[tuple[ModelRef, int]]]:
        """Every output tensor of a `models:` / `slices:` recipe, and where each output layer comes from."""
        tensors: list[PlannedTensor] = []

        # Tensors outside the layers: embeddings from the first slice, the rest from the last.
        first, last = slices[0], slices[-1]
        layers = output_layers(slices)
        count = lambda ref: self.meta(ref).layout.num_layers  # noqa: E731
        for name in donor.layout.pre:
            pt = self._plan_outside(name, first, layers, count)
            if pt:
                tensors.append(pt)
        out_layer = 0
        stack: list[tuple[ModelRef, int]] = []  # where each output layer comes from (its first source)
        for si, sl in enumerate(slices):
            start0, end0 = sl.sources[0].layer_range
            n = end0 - start0
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                template = self.meta(sl.sources[0].model).layout
                for suffix in self._layer_suffixes(sl, offset):
                    inputs = []
                    for src in sl.sources:
                        lay = self.meta(src.model).layout
                        inputs.append((src.model, lay.layer_name(src.layer_range[0] + offset, suffix)))
                    out_name = donor.layout.layer_name(out_layer, suffix) if donor.layout.prefix \
                        else template.layer_name(out_layer, suffix)
                    pt = self._plan_tensor(out_name, inputs, sl, t=t)
                    if pt:
                        tensors.append(pt)
                stack.append((sl.sources[0].model, start0 + offset))
                out_layer += 1
        for name in donor.layout.post:
            pt = self._plan_outside(name, last, layers, count)
            if pt:
                tensors.append(pt)

        return tensors, stack

    def _plan_outside(self, name: str, sl: OutputSlice, layers: list[tuple[OutputSlice, int, float]],
                      layer_count, module_params: Optional[dict] = None) -> Optional[PlannedTensor]:
        """A tensor outside the layers, merged from ``sl``'s sources; one that packs a block per layer is
        restacked block by block after ``layers`` (each output layer's slice, offset and t), unless every
        output layer is the same layer of the same models. ``layer_count(ref)``: the layers of a model."""
        ref0 = sl.sources[0].model
        m0 = self.meta(ref0)
        tm0 = m0.index.get(name)
        dim = packed_dim(name, tuple(tm0.shape), layer_count(ref0), m0.config) if tm0 is not None else None
        models = {s.model for s in sl.sources}
        same = all(layer_count(s.model) == len(layers) for s in sl.sources) and all(
            {s.model for s in lsl.sources} == models and all(s.layer_range[0] + off == j for s in lsl.sources)
            for j, (lsl, off, _) in enumerate(layers))
        if dim is None or same:
            return self._plan_tensor(name, [(s.model, name) for s in sl.sources], sl, t=0.0,
                                     module_params=module_params)
        return self._plan_packed(name, dim, layers, layer_count, module_params)

    def _plan_packed(self, name: str, dim: int, layers: list[tuple[OutputSlice, int, float]], layer_count,
                     module_params: Optional[dict]) -> PlannedTensor:
        """A tensor packing one block per layer, restacked: output block j is planned as a tensor of output
        layer j (its slice's sources, parameters and t) from the blocks of the source layers."""
        source = self.recipe.source
        inputs: dict[ModelRef, int] = {}
        full: list[TensorInput] = []
        width = None
        blocks, block_pts = [], []
        for j, (sl, off, t) in enumerate(layers):
            metas, idx, src_blocks = [], [], []
            for src in sl.sources:
                m = self.meta(src.model)
                tm = m.index.get(name)
                n = layer_count(src.model)
                d = packed_dim(name, tuple(tm.shape), n, m.config) if tm is not None else None
                if d != dim:
                    what = "is missing from" if tm is None else f"{list(tm.shape)} does not pack one block per " \
                                                                f"layer along dimension {dim} in"
                    raise UserError(f"tensor {name} {what} model {src.model}", source=source)
                w = tm.shape[dim] // n
                if width is None:
                    width = w
                elif w != width:
                    raise UserError(f"tensor {name} packs blocks of {w} per layer in {src.model}, not {width} as "
                                    "in the other models", source=source)
                if src.model not in inputs:
                    inputs[src.model] = len(full)
                    full.append(TensorInput(self.model_index(src.model), name, tm.file, tuple(tm.shape),
                                            dtype_name(tm.dtype)))
                block_shape = tuple(width if k == dim else s for k, s in enumerate(tm.shape))
                metas.append((src.model, name, dataclasses.replace(tm, shape=block_shape)))
                idx.append(inputs[src.model])
                src_blocks.append(src.layer_range[0] + off)
            bpt = self._plan_metas(name, metas, sl, t, module_params)
            if bpt.row_remap is not None:
                raise UserError(f"tensor {name} packs one block per layer and is on the vocabulary axis: a stack "
                                "that changes the layers cannot also align vocabularies (tokenizer settings, "
                                "--unsafe-truncate-embeddings)", source=source)
            blocks.append(PackedBlock(tuple(idx), tuple(src_blocks), bpt.base_index, bpt.params,
                                      tuple(bpt.model_params)))
            block_pts.append(bpt)
        first = block_pts[0]
        computes = [b.compute_dtype for b in block_pts]
        compute = None if None in computes else _promoted_dtype([getattr(torch, c) for c in computes])
        out_dtype = _promoted_dtype([getattr(torch, b.out_dtype) for b in block_pts])
        shape = tuple(width * len(layers) if k == dim else s for k, s in enumerate(first.shape))
        numel = 1
        for d in shape:
            numel *= d
        in_bytes = sum(math.prod(i.shape) * itemsize(i.dtype) for i in full)
        # the inputs, the output, and one block's merge at a time
        work = in_bytes + numel * itemsize(compute or out_dtype) + max(b.working_bytes for b in block_pts)
        return PlannedTensor(name=name, shape=shape, out_dtype=out_dtype, inputs=full, base_index=None,
                             compute_dtype=compute, params=first.params, model_params=[], method=first.method,
                             working_bytes=int(work), packed=Packed(dim, width, tuple(blocks)))

    def _normalized_slices(self) -> list[OutputSlice]:
        """`models:` becomes one slice over every layer; the base joins the sources."""
        recipe = self.recipe
        out = []
        for i, sl in enumerate(recipe.slices):
            sources = list(sl.sources)
            for j, src in enumerate(sources):
                n = self.meta(src.model).layout.num_layers
                if src.layer_range is None:  # a copy: the recipe is never changed
                    sources[j] = src = dataclasses.replace(src, layer_range=(0, n))
                elif src.layer_range[1] > n:
                    key = f"slices[{i}].sources[{j}].layer_range"
                    raise UserError(f"{list(src.layer_range)} is out of range: {src.model} has {n} layers",
                                    source=recipe.source, key=key)
            if recipe.from_models:
                lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
                if len(lengths) > 1:
                    raise UserError(f"models have different layer counts {sorted(lengths)}",
                                    source=recipe.source, key="models")
            base = sl.base_model or recipe.base_model
            if recipe.from_models and base is not None and all(s.model != base for s in sources):

                n = self.meta(base).layout.num_layers
                sources.append(SliceSource(model=base, layer_range=(0, n)))
            out.append(OutputSlice(sources=sources, base_model=sl.base_model, parameters=sl.parameters))
        return out

    def _layer_suffixes(self, sl: OutputSlice, offset: int) -> tuple[str, ...]:
        """The tensors of one output layer: its sources' layers must hold the same tensors (and, but with
        --allow-crimes, be of the same kind in their configs)."""
        rows = []
        for src in sl.sources:
            m = self.meta(src.model)
            rows.append((src.model, m, src.layer_range[0] + offset))
        (ref0, _, i0), suffixes = rows[0], rows[0][1].layout.suffixes(rows[0][2])
        for ref, m, i in rows[1:]:
            other = m.layout.suffixes(i)
            if set(other) != set(suffixes):
                only0 = sorted(set(suffixes) - set(other))
                only1 = sorted(set(other) - set(suffixes))
                raise UserError(
                    f"layer {i0} of {ref0} and layer {i} of {ref} have different tensors (only in the first: "
                    f"{_few(only0)}; only in the second: {_few(only1)}); layers of different structure cannot "
                    "be merged", source=self.recipe.source)
        if not _same_layers(rows):
            check_same_layers([(f"layer {i} of {ref}", self._layer_values(m), i) for ref, m, i in rows],
                              self.allow_crimes)
        return suffixes

    def _layer_values(self, m: _ModelMeta) -> dict[str, list]:
        if m.ref not in self._values:
            self._values[m.ref] = layer_values(m.config)
        return self._values[m.ref]

    def _check_architectures(self) -> None:
        if self.allow_crimes:
            return
        archs = {}
        for ref, m in self._meta.items():
            arch = tuple(m.config.get("architectures") or [m.config.get("model_type")])
            archs.setdefault(arch, []).append(str(ref))
        if len(archs) > 1:
            desc = "; ".join(f"{a[0]}: {', '.join(ms)}" for a, ms in archs.items())
            raise UserError(f"models have different architectures ({desc}); pass --allow-crimes to merge anyway",
                            source=self.recipe.source)

    def _plan_tensor(self, out_name: str, inputs: list[tuple[ModelRef, str]], sl: OutputSlice,
                     t: float, module_params: Optional[dict] = None,
                     method: Optional[MergeMethod] = None) -> Optional[PlannedTensor]:
        """``module_params``: the parameters of a `modules:` recipe's module (between slice and global);
        ``method``: another method than the recipe's (copy, for the modules a recipe does not list)."""
        recipe = self.recipe
        metas: list[tuple[ModelRef, str, TensorMeta]] = []
        for ref, name in inputs:
            m = self.meta(ref)
            tm = m.index.get(name)
            if tm is None:
                tied = _tied_alias(name, m)
                tm = m.index.get(tied) if tied else None
                name = tied if tm is not None else name
            if tm is None:
                if _is_optional(name, m):
                    continue
                raise UserError(f"tensor {name} is missing from model {ref}", source=recipe.source)
            metas.append((ref, name, tm))
        if not metas:
            return None  # an optional tensor (e.g. a tied lm_head) nobody has
        return self._plan_metas(out_name, metas, sl, t, module_params, method)

    def _plan_metas(self, out_name: str, metas: list[tuple[ModelRef, str, TensorMeta]], sl: OutputSlice, t: float,
                    module_params: Optional[dict] = None, method: Optional[MergeMethod] = None) -> PlannedTensor:
        """One output tensor from its inputs' metadata (model, tensor name, meta)."""
        recipe = self.recipe
        base_ref = sl.base_model or recipe.base_model
        shapes = {tm.shape for _, _, tm in metas}
        vocab_rows = self.vocab is not None and self.vocab.is_vocab_tensor(out_name, shapes)
        truncate = (not vocab_rows and len(shapes) > 1 and self.unsafe_truncate_embeddings
                    and is_vocab_tensor_name(out_name))
        if vocab_rows or truncate:  # rows are remapped to the output vocabulary; the widths must agree
            check_vocab_widths(out_name, metas, recipe.source)
        elif len(shapes) > 1:

            desc = ", ".join(f"{ref}: {list(tm.shape)}" for ref, _, tm in metas)
            raise UserError(f"tensor {out_name} has different shapes across models ({desc})"
                            f"{shape_mismatch_hint(out_name)}", source=recipe.source)

        method = method or self.method
        base_index = None
        for i, (ref, _, _) in enumerate(metas):
            if ref == base_ref:
                base_index = i
                break
        if method.base_model == "required" and base_index is None:
            raise UserError(f"merge method {method.name!r} needs base_model {base_ref} among the inputs of {out_name}",
                            source=recipe.source)
        first_dtype = metas[0][2].dtype
        non_float = not first_dtype.is_floating_point
        if any(not tm.dtype.is_floating_point for _, _, tm in metas):
            _check_buffer(out_name, metas, recipe.source)
        # Non-float buffers (integer position ids, masks) are copied from the first input, not merged.
        planned = get_method("copy", internal=True) if non_float else method
        planned.check_inputs(len(metas), base_index is not None, where=out_name, source=recipe.source)

        # Parameters: slice source > slice > module > global (mergekit's precedence).
        shared_scopes = [sl.parameters, module_params, recipe.parameters]
        params = {}
        for p in method.global_params:
            v = resolve(p, shared_scopes, out_name, t)
            params[p.name] = self._default(p, v, out_name, None, is_base=False)
        model_params = []
        for i, (ref, in_name, _) in enumerate(metas):
            src_params = next((s.parameters for s in sl.sources if s.model == ref), {})
            scopes = [src_params, sl.parameters, module_params, recipe.parameters]
            mp = {}
            for p in method.model_params:
                v = resolve(p, scopes, in_name, t)
                mp[p.name] = self._default(p, v, in_name, ref, is_base=i == base_index)
            model_params.append(mp)

        compute = recipe.dtype
        if non_float:
            compute = None
        elif compute is None:  # mergekit: the inputs promoted to one dtype (bf16 + fp16 -> fp32), output too
            compute = _promoted_dtype([tm.dtype for _, _, tm in metas])
            if compute not in DTYPE_BY_NAME:  # float8 and other storage-only formats: no arithmetic in them
                raise UserError(f"tensor {out_name} is {compute} in the inputs, which cannot be merged in that "
                                "dtype; set dtype (e.g. dtype: bfloat16) to merge in it", source=recipe.source,
                                key="dtype")
        out_dtype = recipe.out_dtype or compute or dtype_name(first_dtype)
        half_result = method.extra.get("half_result_dtype")
        if half_result and not recipe.out_dtype and out_dtype in ("float16", "bfloat16"):
            out_dtype = half_result  # mergekit writes what such a method returns
        if non_float:
            out_dtype = dtype_name(first_dtype)
        shape = metas[0][2].shape
        numel = 1
        for d in shape:
            numel *= d
        compute_itemsize = DTYPE_BY_NAME[compute].itemsize if compute else first_dtype.itemsize
        in_bytes = sum(tm.numel * tm.dtype.itemsize for _, _, tm in metas)
        temporaries = (len(metas) * (1 + planned.extra.get("workspace_per_input", 0))
                       + planned.extra.get("workspace_tensors", 2))
        work = in_bytes + numel * compute_itemsize * temporaries
        pt = PlannedTensor(
            name=out_name,
            shape=tuple(shape),
            out_dtype=out_dtype,
            inputs=[TensorInput(self.model_index(ref), name, tm.file, tuple(tm.shape), dtype_name(tm.dtype))
                    for ref, name, tm in metas],
            base_index=base_index,
            compute_dtype=compute,
            params=params,
            model_params=model_params,
            method=planned.name,
            working_bytes=int(work),
        )
        if vocab_rows:
            pt = self.vocab.remapped(pt, method)
        elif truncate:
            pt = truncated(pt, method)
            self._truncated_rows = min(pt.shape[0], self._truncated_rows or pt.shape[0])
        return pt

    def _default(self, p, value, tensor: str, model: Optional[ModelRef], *, is_base: bool):

        if value is not _MISSING:
            return value
        if p.required:
            if is_base and p.non_base:
                return None  # e.g. a task vector's weight: the base has no task vector
            where = f"model {model}" if model is not None else "the recipe's parameters"
            raise UserError(f"missing required parameter {p.name!r} for {where} (tensor {tensor})",
                            source=self.recipe.source)
        return p.default

    def _out_config(self, donor: _ModelMeta, stack: list[tuple[ModelRef, int]], cfg: Optional[dict] = None) -> dict:
        """The donor's config.json for the output; for slices, every per-layer field (layer count, layer types,
        MoE layers ...) rewritten from the layers each output layer comes from (see layer_config)."""
        if cfg is not None:
            pass  # a `modules:` recipe: each module's layer fields already rewritten (planner/modules.py)
        elif self.recipe.from_models:
            cfg = copy.deepcopy(donor.config)
        else:
            cfg = stack_layer_fields(donor.config, self._layer_values(donor),
                                     [(self._layer_values(self.meta(ref)), i) for ref, i in stack],
                                     [f"layer {i} of {ref}" for ref, i in stack])
        cfg = unquantized_config(cfg)  # quantized inputs are read dequantized and written unquantized
        dtype = self.recipe.out_dtype or self.recipe.dtype
        if dtype:
            cfg["torch_dtype"] = dtype
            if "dtype" in cfg:
                cfg["dtype"] = dtype
        return cfg

    def _shard(self, tensors: list[PlannedTensor]) -> tuple[list[PlannedTensor], list[Shard]]:
        """Cut the tensors, in order, into output shards; return them with their shard set, and the shards."""
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            b = t.out_bytes
            if groups[-1] and size + b > self.out_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += b
        n = len(groups)
        shards = [Shard(i, f"model-{i + 1:05d}-of-{n:05d}.safetensors", [t.name for t in g],
                        sum(t.out_bytes for t in g)) for i, g in enumerate(groups)]
        return [dataclasses.replace(t, shard=i) for i, g in enumerate(groups) for t in g], shards


def _check_buffer(out_name: str, metas: list[tuple[ModelRef, str, TensorMeta]], source) -> None:
    """Integer and bool tensors are never merged as numbers (mergekit's rule): one that every input holds
    identically (a buffer: position ids, a mask) is copied; anything else (quantized weights) is refused."""
    kinds = ", ".join(f"{dtype_name(tm.dtype)} in {ref}" for ref, _, tm in metas)
    if any(tm.dtype.is_floating_point for _, _, tm in metas):
        raise UserError(f"tensor {out_name} mixes integer and floating-point dtypes ({kinds}); "
                        "integer tensors cannot be merged", source=source)
    if len(metas) > 1 and not same_data([(name, tm) for _, name, tm in metas]):
        raise UserError(f"tensor {out_name} has dtype {dtype_name(metas[0][2].dtype)} and differs between the "
                        f"models ({kinds}); integer tensors (quantized weights?) cannot be merged, only a buffer "
                        "every model holds identically is copied", source=source)


def _promoted_dtype(dtypes) -> str:
    """The dtype every input of a tensor is cast to when the recipe sets none (torch's type promotion)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return dtype_name(out)


def _few(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# config.json keys that say nothing about a layer's structure
_CONFIG_METADATA = ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "architectures")


def _same_layers(rows) -> bool:
    """Whether (model, meta, layer) rows are the same layer of models with the same config: then their per-layer
    config fields agree without reading them (which needs transformers' config classes: seconds at start-up)."""
    (_, m0, i0) = rows[0]
    strip = lambda c: {k: v for k, v in c.items() if k not in _CONFIG_METADATA}  # noqa: E731
    first = strip(m0.config)
    return all(i == i0 and strip(m.config) == first for _, m, i in rows[1:])


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _tied_alias(name: str, m: _ModelMeta) -> Optional[str]:
    """lm_head of a model with tied embeddings lives in its input embedding."""
    if name.endswith("lm_head.weight") and m.config.get("tie_word_embeddings", False):
        for cand in m.layout.pre:
            if "embed_tokens" in cand or "wte" in cand or "word_embeddings" in cand:
                return cand
    return None


def _is_optional(name: str, m: _ModelMeta) -> bool:
    return name.endswith("lm_head.weight") or "rotary_emb" in name


def plan_recipe(recipe: Recipe, **kw) -> Plan:
    return Planner(recipe, **kw).plan()
