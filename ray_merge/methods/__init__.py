"""Merge method registry. Importing this package registers every method."""
from ray_merge.methods.base import MergeInputs, MergeMethod, Param, all_methods, get_method, register

# Each module registers its methods on import.
from ray_merge.methods import linear  # noqa: F401,E402

__all__ = ["MergeInputs", "MergeMethod", "Param", "all_methods", "get_method", "register"]
