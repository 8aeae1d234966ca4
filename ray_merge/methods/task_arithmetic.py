"""The task-arithmetic family: task_arithmetic, ties, dare_*, della*, breadcrumbs*.

All of them are one algorithm with two switches (Ilharco et al. 2022; Yadav et
al. 2023; Yu et al. 2023; Deep et al. 2024; Davari & Belilovsky 2023):

1. Task vectors: subtract the base model from each fine-tuned model.
2. Sparsify each task vector (optional): by magnitude (TIES), at random (DARE),
   by magnitude-ranked random pruning (DELLA) or by dropping both the smallest
   entries and the largest outliers (Breadcrumbs), optionally rescaling what is
   left to the original L1 norm.
3. Weight each task vector.
4. Elect a sign per entry (optional, TIES): the sign of the summed weighted
   task vectors; entries that disagree with it are dropped.
5. Sum, divide by the weight that took part at each entry (``normalize``),
   scale by ``lambda`` and add back to the base.

Each registered method is a row of ``VARIANTS``, declared by ``_declare``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

from ray_merge.methods import sparsify
from ray_merge.methods._common import base_and_others, round_, round_scalar
from ray_merge.methods._deferred import deferred
from ray_merge.methods._select import CHUNK
from ray_merge.methods.base import MergeInputs, Param, merge_method
from ray_merge.methods.consensus import SUM, agreeing_sum_, elect_sign

torch = deferred("torch")


@dataclass(frozen=True)
class Variant:
    name: str
    pretty_name: str
    reference_url: str
    sparsification: Optional[str]  # one of sparsify.METHODS
    consensus: Optional[str]  # SUM, COUNT or None
    default_normalize: bool
    default_rescale: bool
    summary: str


VARIANTS = (
    Variant("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
            None, None, False, False,
            "adds the weighted sum of task vectors to the base"),
    Variant("ties", "TIES", "https://arxiv.org/abs/2306.01708",
            sparsify.MAGNITUDE, SUM, True, False,
            "trims task vectors to their largest entries, elects a sign per entry, "
            "averages the agreeing entries"),
    Variant("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
            sparsify.RANDOM, SUM, False, True,
            "drops task-vector entries at random and rescales, then elects signs as TIES"),
    Variant("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
            sparsify.RANDOM, None, False, True,
            "drops task-vector entries at random and rescales, then sums"),
    Variant("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
            sparsify.MAGNITUDE_OUTLIERS, None, False, False,
            "drops the smallest entries and the largest outliers of task vectors, then sums"),
    Variant("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
            sparsify.MAGNITUDE_OUTLIERS, SUM, False, False,
            "Breadcrumbs pruning followed by TIES sign election"),
    Variant("della", "DELLA", "https://arxiv.org/abs/2406.11617",
            sparsify.DELLA_MAGPRUNE, SUM, True, True,
            "drops task-vector entries with a probability falling with magnitude rank, "
            "rescales, then elects signs as TIES"),
    Variant("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
            sparsify.DELLA_MAGPRUNE, None, False, True,
            "DELLA pruning and rescaling, then a weighted sum"),
)


# The per-model option of a sparsifier besides density, passed on to ``sparsify.plan`` by name.
SPARSIFIER_OPTIONS = {
    sparsify.MAGNITUDE_OUTLIERS: Param("gamma", 0.01, per_model=True, non_base=True, min=0.0, max=1.0,
                                       help="fraction of largest-magnitude entries to drop"),
    sparsify.DELLA_MAGPRUNE: Param("epsilon", 0.15, per_model=True, non_base=True, min=0.0, max=0.5,
                                   help="keep probabilities span density +/- epsilon by magnitude rank"),
}


def merge_task_arithmetic(variant: Variant, inp: MergeInputs) -> torch.Tensor:
    """Merge one tensor with ``variant`` (steps 1-5 of the module docstring).

    Only the non-base models have task vectors; with none, the base is returned.
    Sparsification is planned per task vector first (thresholds, masks, rescale
    factors); then one streaming pass over the tensor, in cache-sized chunks,
    recomputes the deltas, applies the plans, elects signs and writes the
    output, so no full-size task vector is ever stored.

    Arithmetic is float32 (float64 stays); for a half-precision recipe every
    intermediate result mergekit stores in that precision is rounded to it here
    too, so the outputs agree to the last bit but for summation order.
    """
    base, others, model_params = base_and_others(inp, variant.name)
    if not others:
        return base
    params = inp.params
    keep_dtype = base.dtype  # the precision mergekit keeps task vectors in
    weights = [round_scalar(float(p["weight"]), keep_dtype) for p in model_params]
    task_vectors = [sparsify.TaskVector(m, base) for m in others]
    keeps = [sparsify.Keep() for _ in others]
    if variant.sparsification:
        option = SPARSIFIER_OPTIONS.get(variant.sparsification)
        keeps = [
            sparsify.plan(
                tv,
                variant.sparsification,
                mp["density"],
                rescale=bool(params["rescale"]),
                generator=inp.generator,
                dtype=keep_dtype,
                **({option.name: mp[option.name]} if option else {}),
            )
            for tv, mp in zip(task_vectors, model_params)
        ]
    combine = _Combine(
        weights=weights,
        keeps=keeps,
        consensus=variant.consensus,
        normalize=bool(params["normalize"]),
        lam=float(params["lambda"]),
        keep_dtype=keep_dtype,
    )
    return combine(task_vectors, base)


@dataclass
class _Combine:
    """Steps 3-5, one cache-sized chunk of every task vector at a time."""

    weights: list[float]
    keeps: list[sparsify.Keep]
    consensus: Optional[str]
    normalize: bool
    lam: float
    keep_dtype: torch.dtype  # the recipe precision, which mergekit rounds to

    def __post_init__(self):
        self.half = self.keep_dtype in (torch.float16, torch.bfloat16)
        self.total_weight = round_scalar(sum(self.weights), self.keep_dtype)
        # Positive per-model multipliers (weight x rescale factor) are folded into
        # the sums rather than given a pass of their own; half precision needs
        # mergekit's separate roundings instead.
        scales = [w * k.factor for w, k in zip(self.weights, self.keeps)]
        self.scales = None if self.half or min(scales) <= 0 else scales

    def __call__(self, task_vectors: list[sparsify.TaskVector], base: torch.Tensor) -> torch.Tensor:
        n = base.numel()
        out = torch.empty(n, dtype=base.dtype)
        flat_base = base.reshape(-1)

        # Half-precision inputs of the recipe's dtype are sparsified and weighted in that
        # dtype (torch rounds each op's float result, as the separate roundings would).
        native = self.half and all(tv.native_dtype == self.keep_dtype for tv in task_vectors)

        size = min(CHUNK, max(n, 1))
        buffers = [torch.empty(size, dtype=tv.dtype) for tv in task_vectors]
        halves = [torch.empty(size, dtype=self.keep_dtype) for _ in task_vectors] if native else None
        for start in range(0, n, size):
            stop = min(start + size, n)
            if native:
                deltas = [
                    buf[: stop - start].copy_(
                        self._weighted(i, tv.native_chunk(start, stop, out=h[: stop - start]), start))
                    for i, (tv, buf, h) in enumerate(zip(task_vectors, buffers, halves))
                ]
                rounded = halves[0][: stop - start]  # free again: holds the rounded result
            else:
                deltas = [
                    self._weighted(i, tv.chunk(start, stop, out=buf[: stop - start]), start)
                    for i, (tv, buf) in enumerate(zip(task_vectors, buffers))
                ]
                rounded = None
            self._merge(deltas, flat_base[start:stop], out[start:stop], rounded)
        return out.view(base.shape)

    def _weighted(self, i: int, delta: torch.Tensor, start: int) -> torch.Tensor:
        """Sparsify one chunk of task vector ``i`` and apply its weight (unless folded)."""
        keep = self.keeps[i]
        keep.apply_(delta, start)
        if self.half and delta.dtype == self.keep_dtype:  # rounded by each op
            if keep.factor != 1.0:
                delta.mul_(keep.factor)
            return delta.mul_(self.weights[i])
        if self.half:
            if keep.factor != 1.0:
                round_(delta.mul_(keep.factor), self.keep_dtype)
            return round_(delta.mul_(self.weights[i]), self.keep_dtype)
        if self.scales is None:
            delta.mul_(self.weights[i] * keep.factor)
        return delta

    def _merge(self, deltas: list[torch.Tensor], base: torch.Tensor, out: torch.Tensor,
               rounded: Optional[torch.Tensor] = None) -> None:
        """Write base + lambda * (elected) sum / divisor for one chunk into ``out``
        (``rounded``: a scratch chunk of the recipe's half dtype, if there is one)."""
        scales = self.scales or [1.0] * len(deltas)
        divisor = None
        if self.consensus:
            sign = elect_sign(deltas, self.consensus, scales)
            weights = self.weights if self.normalize else None
            mixed, divisor = agreeing_sum_(deltas, sign, weights, scales)
            if divisor is not None:
                round_(divisor, self.keep_dtype)
                if min(self.weights) > 0:
                    # With positive weights a divisor is 0 or >= the smallest weight, and
                    # where it is 0 nothing agreed (mixed is 0): any non-zero value will do.
                    divisor.clamp_(min=min(self.weights))
                else:
                    divisor.masked_fill_(divisor == 0, 1)
        else:
            mixed = deltas[0] if scales[0] == 1.0 else deltas[0].mul_(scales[0])
            for d, c in zip(deltas[1:], scales[1:]):
                mixed.add_(d, alpha=c)
            if self.normalize and abs(self.total_weight) >= 1e-8:
                divisor = self.total_weight
        round_(mixed, self.keep_dtype)
        if not self.half:  # fused: base + lambda * mixed / divisor
            if isinstance(divisor, torch.Tensor):
                torch.addcdiv(base, mixed, divisor, value=self.lam, out=out)
            else:
                torch.add(base, mixed, alpha=self.lam / (divisor or 1.0), out=out)
            return
        if divisor is not None:
            round_(mixed.div_(divisor), self.keep_dtype)
        if self.lam != 1:
            round_(mixed.mul_(self.lam), self.keep_dtype)
        if rounded is not None and base.dtype == out.dtype == rounded.dtype:
            mixed = rounded.copy_(mixed)  # exact: mixed is rounded already; a same-dtype add is faster
        torch.add(base, mixed, out=out)


def _params(v: Variant) -> tuple[Param, ...]:
    params = [
        Param("weight", per_model=True, non_base=True,
              help="scale of this model's task vector"),
        Param("density", 1.0, per_model=True, non_base=True, min=0.0, max=1.0,
              help="fraction of the task vector's entries to keep"
              + ("" if v.sparsification else " (no effect for this method)")),
    ]
    if v.sparsification in SPARSIFIER_OPTIONS:
        params.append(SPARSIFIER_OPTIONS[v.sparsification])
    params += [
        Param("lambda", 1.0, help="scale of the merged task vector"),
        Param("normalize", v.default_normalize, kind=bool,
              help="divide by the sum of weights taking part at each entry"),
        Param("rescale", v.default_rescale, kind=bool,
              help="after sparsifying, restore each task vector's L1 norm"),
        Param("int8_mask", False, kind=bool,
              help="accepted for mergekit compatibility; masks are always compact here"),
    ]
    return tuple(params)


def _declare(v: Variant) -> None:
    randomized = v.sparsification in (sparsify.RANDOM, sparsify.DELLA_MAGPRUNE)
    merge_method(
        v.name,
        params=_params(v),
        base_model="required",
        randomized=randomized,
        # Without sparsification or sign election every entry is independent.
        row_splittable=v.sparsification is None and v.consensus is None,
        pretty_name=v.pretty_name,
        reference_url=v.reference_url,
        description=v.summary,
        extra={
            "sparsification": v.sparsification,
            "consensus": v.consensus,
            # the output, plus a stored keep-mask per model for random pruning
            "workspace_tensors": 1,
            "workspace_per_input": 0.5 if randomized else 0,
        },
    )(partial(merge_task_arithmetic, v))


for _v in VARIANTS:
    _declare(_v)
del _v
