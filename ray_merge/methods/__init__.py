"""Merge methods. Importing this package registers every method.

A method is one function declared with ``@merge_method`` in one of the family
modules below (see ``base``); add a new module's import here.
"""
from ray_merge.methods import (  # noqa: F401  (each module registers its methods on import)
    arcee_fusion,
    linear,
    model_stock,
    nearswap,
    ram,
    sce,
    spherical,
    task_arithmetic,
)
from ray_merge.methods.base import (
    MergeInputs,
    MergeMethod,
    Param,
    all_methods,
    get_method,
    merge_method,
    register,
)

__all__ = ["MergeInputs", "MergeMethod", "Param", "all_methods", "get_method", "merge_method", "register"]
