"""The method registry: declarations checked against method bodies, input counts, the internal copy method."""
from __future__ import annotations

import pytest
import torch

from ray_merge.errors import UserError
from ray_merge.execute.compute import compute_tensor
from ray_merge.methods import MergeInputs, Param, all_methods, base, get_method, merge_method
from ray_merge.methods.api import merge_tensors
from ray_merge.methods.base import undeclared_reads
from ray_merge.planner import memory
from ray_merge.planner.plan import PlannedTensor, TensorInput


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the registry, so toy methods do not outlive the test."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return base._REGISTRY


def _read_scale(inp: MergeInputs) -> float:
    return float(inp.params["scale"])  # a helper in the same module: followed by the check


def test_every_registered_method_reads_only_declared_params():
    for name, method in base._REGISTRY.items():
        assert undeclared_reads(method.fn, method.params) == [], name


def test_reading_an_undeclared_param_fails_at_registration(registry):
    with pytest.raises(TypeError, match=r"toy_subscript reads parameter 'bogus'.*declared: weight"):
        @merge_method("toy_subscript", params=[Param("weight", per_model=True)])
        def toy_subscript(inp):
            return inp.tensors[0] * inp.model_params[0]["weight"] * inp.params["bogus"]

    with pytest.raises(TypeError, match="toy_get reads parameter 'bogus'"):
        @merge_method("toy_get")
        def toy_get(inp):
            return inp.tensors[0] * inp.params.get("bogus", 1.0)

    with pytest.raises(TypeError, match="toy_helper reads parameter 'scale'.*_read_scale"):
        @merge_method("toy_helper")
        def toy_helper(inp):
            return inp.tensors[0] * _read_scale(inp)

    assert not {"toy_subscript", "toy_get", "toy_helper"} & set(registry)


def test_a_declared_method_registers_and_merges(registry):
    @merge_method("toy_scale", params=[Param("scale", 2.0)], row_splittable=True)
    def toy_scale(inp):
        """Scale the first input."""
        return inp.tensors[0] * _read_scale(inp)

    assert get_method("toy_scale").fn is toy_scale and "toy_scale" in all_methods()
    out = merge_tensors("toy_scale", [torch.ones(3)], params={"scale": 3.0})
    assert torch.equal(out, torch.full((3,), 3.0))


def test_an_undeclared_read_the_static_check_cannot_see_fails_when_merging(registry):
    @merge_method("toy_dynamic", params=[Param("scale", 2.0)])
    def toy_dynamic(inp):
        key = "bo" + "gus"
        return inp.tensors[0] * inp.params[key]

    with pytest.raises(TypeError, match="toy_dynamic reads parameter 'bogus', which it does not declare"):
        merge_tensors("toy_dynamic", [torch.ones(3)])


def test_declared_per_model_param_without_a_value_is_a_plain_miss(registry):
    # the base model gets no value for a non_base parameter: .get() still works there
    @merge_method("toy_base", params=[Param("weight", per_model=True, non_base=True)], base_model="required")
    def toy_base(inp):
        assert inp.model_params[inp.base_index].get("weight") is None
        return inp.base

    merge_tensors("toy_base", [torch.ones(2), torch.zeros(2)], base_index=0,
                  model_params=[{}, {"weight": 1.0}])


def test_duplicate_names_and_params_are_rejected(registry):
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("linear")(lambda inp: inp.tensors[0])
    with pytest.raises(ValueError, match="declared twice"):
        merge_method("toy_dup", params=[Param("t"), Param("t")])(lambda inp: inp.tensors[0])


def test_internal_copy_method_is_not_a_recipe_method():
    assert "copy" not in all_methods()
    with pytest.raises(UserError, match="unknown merge method 'copy'"):
        get_method("copy")
    copy = get_method("copy", internal=True)
    assert copy.row_splittable and not copy.randomized


def _buffer(shape=(4, 3), dtype="int64") -> PlannedTensor:
    return PlannedTensor(
        name="model.buf", shape=shape, out_dtype=dtype,
        inputs=[TensorInput(i, "model.buf", "f", shape, dtype) for i in range(2)],
        base_index=0, compute_dtype=None, params={}, model_params=[{}, {}], method="copy", working_bytes=1,
    )


def test_integer_buffers_are_copied_from_the_first_input():
    pt = _buffer()
    a = torch.arange(12, dtype=torch.int64).view(4, 3)
    out = compute_tensor(pt, [a, a + 100], seed=0)
    assert torch.equal(out, a) and out.dtype == torch.int64 and out.data_ptr() != a.data_ptr()
    assert memory.row_splittable(pt)


def test_planner_checks_input_counts(models_dir):
    """At planning time (metadata only), not in the middle of a merge."""
    from ray_merge.planner.plan import plan_recipe
    from ray_merge.recipe.load import recipe_from_dict

    recipe = recipe_from_dict({
        "merge_method": "slerp", "base_model": f"{models_dir}/llama_base", "parameters": {"t": 0.5},
        "models": [{"model": f"{models_dir}/llama_ft0"}, {"model": f"{models_dir}/llama_ft1"}],
    }, source="r.yml")
    with pytest.raises(UserError, match=r"r.yml: merge method slerp takes exactly 2 input models for \S+; got 3"):
        plan_recipe(recipe)
    recipe = recipe_from_dict({
        "merge_method": "slerp", "base_model": f"{models_dir}/llama_base", "parameters": {"t": 0.5},
        "models": [{"model": f"{models_dir}/llama_ft0"}],
    }, source="r.yml")
    assert {t.method for t in plan_recipe(recipe).tensors} == {"slerp"}
