"""Merge method registry. Importing this package registers every method."""
# Each module registers its methods on import.
from ray_merge.methods import (  # noqa: F401,E402
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
    register,
)

__all__ = ["MergeInputs", "MergeMethod", "Param", "all_methods", "get_method", "register"]
