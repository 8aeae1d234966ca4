"""What a merge method is: a pure function of tensors and resolved parameters.

A method knows nothing of files, shards or workers. The planner resolves every
parameter for one output tensor (filters, gradients, precedence) and the
executor calls ``MergeMethod.merge`` with the input tensors already cast to the
recipe's ``dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ray_merge.errors import UserError

REQUIRED = object()  # sentinel: a parameter with no default


@dataclass(frozen=True)
class Param:
    """One parameter a method takes.

    ``per_model`` parameters (weight, density, ...) are resolved for each input
    model; the others are global (normalize, lambda, t, ...).
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: type = float  # float, int or bool
    help: str = ""
    # A per-model parameter that only the non-base models take (task-vector
    # weights and densities): the base model never needs a value for it, and a
    # method never reads it from the base model's ``model_params``.
    non_base: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method sees for one output tensor.

    tensors: one per input model, in the planner's order (recipe order, the
        base model included once wherever it appears; if the base is not listed
        among the models it comes last).
    base_index: index of the base model's tensor in ``tensors``, or None.
    model_params: one dict per tensor (same order) of the resolved per-model
        parameters, defaults filled in.
    params: the resolved global parameters, defaults filled in.
    generator: a CPU ``torch.Generator`` seeded from (random seed, tensor name);
        randomised methods must draw all randomness from it.
    name: the output tensor's name (for methods that treat e.g. embeddings
        differently).
    """

    tensors: list[torch.Tensor]
    base_index: Optional[int]
    model_params: list[dict]
    params: dict
    generator: Optional[torch.Generator] = None
    name: str = ""

    @property
    def base(self) -> Optional[torch.Tensor]:
        return None if self.base_index is None else self.tensors[self.base_index]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    base_model: "required", "optional" or "none". With "none" the method
        treats every tensor alike, so a base model listed by the recipe (or
        added by the planner) is just one more input.
    row_splittable: True when output rows depend only on the same input rows
        (element-wise methods), so a too-large tensor may be computed in row
        chunks with identical results.
    min_inputs / max_inputs: how many tensors (base included) the method takes.
    min_non_base / max_non_base: how many of them must be non-base models.
    extra: free-form facts for the planner: "workspace_tensors" and
        "workspace_per_input" estimate a method's full-size temporaries (in
        tensors of the compute dtype: fixed + per input model);
        "half_result_dtype" is the dtype the method returns for half-precision
        inputs when that differs from the inputs' (mergekit writes it when the
        recipe sets no out_dtype).
    missing_tensor_policy: what to do with an optional weight (e.g. a tied
        ``lm_head``) that only some inputs have, as mergekit does:
        "error"; "passthrough_singleton" (exactly one input has it: copy it);
        "passthrough_base_singleton" (only the base has it: copy it);
        "base_or_skip" (too few inputs have it: copy the base's if only the
        base has it, otherwise leave the tensor out of the output).
    """

    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    params: tuple[Param, ...] = ()
    base_model: str = "none"
    randomized: bool = False
    row_splittable: bool = False
    pretty_name: str = ""
    reference_url: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None
    missing_tensor_policy: str = "error"

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def param(self, name: str) -> Optional[Param]:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        return self.fn(inputs)

    def check_inputs(self, n_inputs: int, has_base: bool, where: str = "") -> None:
        """Raise a UserError when a tensor's input count breaks the method's contract."""

        label = f" for {where}" if where else ""
        if self.base_model == "required" and not has_base:
            raise UserError(f"merge method {self.name} needs a base_model{label}")
        counted_base = has_base and self.base_model != "none"
        non_base = n_inputs - int(counted_base)
        for what, count, lo, hi in (
            ("input models", n_inputs, self.min_inputs, self.max_inputs),
            ("non-base models", non_base, self.min_non_base, self.max_non_base),
        ):
            lo = lo or 0
            if count < lo or (hi is not None and count > hi):
                if lo == hi:
                    want = f"exactly {lo}"
                elif hi is None:
                    want = f"at least {lo}"
                else:
                    want = f"{lo} to {hi}"
                raise UserError(
                    f"merge method {self.name} takes {want} {what}{label}; got {count}"
                )


_REGISTRY: dict[str, MergeMethod] = {}
_MISSING_TENSOR_POLICIES = (
    "error",
    "passthrough_singleton",
    "passthrough_base_singleton",
    "base_or_skip",
)


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    if method.base_model not in ("required", "optional", "none"):
        raise ValueError(f"{method.name}: base_model must be required/optional/none")
    if method.missing_tensor_policy not in _MISSING_TENSOR_POLICIES:
        raise ValueError(f"{method.name}: unknown missing_tensor_policy")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:

    if name not in _REGISTRY:
        raise UserError(
            f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def all_methods() -> dict[str, MergeMethod]:
    return dict(sorted(_REGISTRY.items()))
