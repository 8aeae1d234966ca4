"""What a merge method is: a pure function of tensors and resolved parameters.

A method knows nothing of files, shards or workers. The planner resolves every
parameter for one output tensor (filters, gradients, precedence) and the
executor calls ``MergeMethod.merge`` with the input tensors already cast to the
recipe's ``dtype``.

A method is one function and its declaration, in one module of this package::

    @merge_method("nearswap", params=[Param("t", help="...")], base_model="required",
                  min_inputs=2, max_inputs=2)
    def nearswap(inp: MergeInputs) -> torch.Tensor:
        ...inp.params["t"]...

The decorator registers it when the package is imported. The declared
parameters are the method's whole schema: registration fails with a TypeError
when the body reads a parameter it does not declare (see ``undeclared_reads``),
and at merge time the body sees its parameters through mappings that refuse
undeclared names, which catches the reads no static check can see.
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from ray_merge.errors import UserError

if TYPE_CHECKING:  # annotations only: importing the methods does not import torch (see _deferred)
    import torch

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
    # The valid range of a number, bounds included; None: unbounded. Recipe
    # validation checks every value a recipe gives (each gradient point and
    # filter value) with ``problem`` before any tensor is read.
    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` (one scalar as a recipe writes it) is not valid here; None when it is."""
        if self.kind is bool:
            if isinstance(value, bool) or value in (0, 1) or str(value).strip().lower() in _BOOL_WORDS:
                return None
            return f"must be true or false, got {value!r}"
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return f"must be a number, got {value!r}"
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return f"must be a number, got {value!r}"
        if not math.isfinite(number):
            return f"must be a finite number, got {value!r}"
        if self.kind is int and number != int(number):
            return f"must be a whole number, got {value!r}"
        below = self.min is not None and number < self.min
        above = self.max is not None and number > self.max
        if below or above:
            if self.min is not None and self.max is not None:
                return f"must be between {self.min:g} and {self.max:g}, got {value!r}"
            if below:
                return f"must be at least {self.min:g}, got {value!r}"
            return f"must be at most {self.max:g}, got {value!r}"
        return None


_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method sees for one output tensor.

    tensors: one per input model, in the planner's order (recipe order, the
        base model included once wherever it appears; if the base is not listed
        among the models it comes last).
    base_index: index of the base model's tensor in ``tensors``, or None.
    model_params: one mapping per tensor (same order) of the resolved per-model
        parameters, defaults filled in.
    params: the resolved global parameters, defaults filled in.
    generator: a CPU ``torch.Generator`` seeded from (random seed, tensor name);
        randomised methods must draw all randomness from it.
    name: the output tensor's name (for methods that treat e.g. embeddings
        differently).
    """

    tensors: list[torch.Tensor]
    base_index: Optional[int]
    model_params: list[Mapping]
    params: Mapping
    generator: Optional[torch.Generator] = None
    name: str = ""

    @property
    def base(self) -> Optional[torch.Tensor]:
        return None if self.base_index is None else self.tensors[self.base_index]


class DeclaredParams(Mapping):
    """Read-only view of resolved parameters that refuses names the method did not declare.

    A declared name without a value (a ``non_base`` parameter of the base model)
    is an ordinary KeyError, so ``.get`` returns its default; an undeclared name
    is a TypeError naming the method: a bug in the method, not in the recipe.
    """

    __slots__ = ("_declared", "_method", "_values")

    def __init__(self, values: Mapping, declared: frozenset, method: str):
        self._values = values
        self._declared = declared
        self._method = method

    def __getitem__(self, key: str) -> Any:
        if key not in self._declared:
            raise TypeError(f"merge method {self._method} reads parameter {key!r}, which it does not declare")
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"DeclaredParams({dict(self._values)!r})"


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
        The planner checks these counts for every output tensor before any
        tensor is read (``check_inputs``).
    extra: free-form facts for the planner: "workspace_tensors" and
        "workspace_per_input" estimate a method's full-size temporaries (in
        tensors of the compute dtype: fixed + per input model);
        "half_result_dtype" is the dtype the method returns for half-precision
        inputs when that differs from the inputs' (mergekit writes it when the
        recipe sets no out_dtype).
    internal: used by the planner itself (e.g. ``copy`` for integer buffers);
        a recipe cannot name it and ``all_methods`` does not list it.
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
    internal: bool = False

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
        """Call the method, its parameters seen through ``DeclaredParams``."""
        global_names = frozenset(p.name for p in self.global_params)
        model_names = frozenset(p.name for p in self.model_params)
        return self.fn(replace(
            inputs,
            params=DeclaredParams(inputs.params, global_names, self.name),
            model_params=[DeclaredParams(mp, model_names, self.name) for mp in inputs.model_params],
        ))

    def check_inputs(self, n_inputs: int, has_base: bool, where: str = "",
                     source: Optional[str] = None) -> None:
        """Raise a UserError when a tensor's input count breaks the method's contract."""

        label = f" for {where}" if where else ""
        if self.base_model == "required" and not has_base:
            raise UserError(f"merge method {self.name} needs a base_model{label}", source=source)
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
                    f"merge method {self.name} takes {want} {what}{label}; got {count}", source=source
                )


# ---------------------------------------------------------------------------------------------
# Which parameters a method body reads
# ---------------------------------------------------------------------------------------------


def _string_key(node: ast.AST) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@functools.lru_cache(maxsize=None)  # one function may back several methods (task_arithmetic's variants)
def _function_tree(fn: Callable) -> Optional[ast.AST]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):  # no source (e.g. defined by exec): the runtime check remains
        return None


def parameter_reads(fn: Callable) -> list[tuple[str, str]]:
    """``(key, where)`` for each parameter read in ``fn`` and the functions of its module it calls.

    By convention a string-keyed subscript ``x["key"]`` or ``x.get("key", ...)``
    in a method body is a parameter read (method bodies use no other
    string-keyed lookups). Helpers are followed when called by a plain name
    that is a function defined in the same module. Reads with computed keys
    are left to ``DeclaredParams`` at merge time.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    reads: list[tuple[str, str]] = []
    seen: set = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        tree = _function_tree(f)
        if tree is None:
            continue
        line0 = f.__code__.co_firstlineno - 1
        top = tree.body[0] if tree.body else None
        # a def's body only: its decorators (the declaration itself) are not reads
        body = top.body if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else [tree]
        for node in (n for stmt in body for n in ast.walk(stmt)):
            key = None
            if isinstance(node, ast.Subscript):
                key = _string_key(node.slice)
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr == "get" and node.args:
                    key = _string_key(node.args[0])
                elif isinstance(func, ast.Name):
                    callee = f.__globals__.get(func.id)
                    if inspect.isfunction(callee) and callee.__module__ == f.__module__:
                        todo.append(callee)
            if key is not None:
                reads.append((key, f"{f.__module__}.{f.__qualname__}, line {line0 + node.lineno}"))
    return reads


def undeclared_reads(fn: Callable, params: tuple[Param, ...]) -> list[tuple[str, str]]:
    """The parameter reads of ``fn`` (see ``parameter_reads``) that ``params`` does not declare."""
    declared = {p.name for p in params}
    return [(key, where) for key, where in parameter_reads(fn) if key not in declared]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry after checking its declaration against its body."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    if method.base_model not in ("required", "optional", "none"):
        raise ValueError(f"{method.name}: base_model must be required/optional/none")
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        raise ValueError(f"{method.name}: a parameter is declared twice ({', '.join(names)})")
    undeclared = undeclared_reads(method.fn, method.params)
    if undeclared:
        key, where = undeclared[0]
        raise TypeError(f"merge method {method.name} reads parameter {key!r} ({where}) but does not declare it; "
                        f"declared: {', '.join(names) or 'none'}")
    _REGISTRY[method.name] = method
    return method


def merge_method(name: str, *, params=(), **fields) -> Callable:
    """Declare and register the decorated function as merge method ``name``.

    ``params`` lists its ``Param``s; ``fields`` are the other ``MergeMethod``
    fields. Returns the function unchanged. Also usable as a plain call,
    ``merge_method(name, ...)(fn)``, to register one function several times
    (e.g. a ``functools.partial`` per variant).
    """

    def decorate(fn: Callable) -> Callable:
        register(MergeMethod(name=name, fn=fn, params=tuple(params), **fields))
        return fn

    return decorate


def get_method(name: str, *, internal: bool = False) -> MergeMethod:
    """The method ``name``; a UserError naming the known ones when there is none.

    Internal methods are found only with ``internal=True`` (the executor's
    lookup of a planned tensor's method).
    """
    method = _REGISTRY.get(name)
    if method is None or (method.internal and not internal):
        raise UserError(
            f"unknown merge method {name!r}; known: {', '.join(all_methods())}"
        )
    return method


def all_methods() -> dict[str, MergeMethod]:
    """Every method a recipe may name, by name."""
    return {n: m for n, m in sorted(_REGISTRY.items()) if not m.internal}
