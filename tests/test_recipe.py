"""Recipe loading, validation and parameter resolution (no models needed)."""
import pytest

from ray_merge.errors import UserError
from ray_merge.methods import get_method
from ray_merge.recipe.load import load_recipe, recipe_from_dict
from ray_merge.recipe.params import _MISSING, evaluate_setting, resolve


def _write(tmp_path, text):
    p = tmp_path / "r.yml"
    p.write_text(text)
    return str(p)


LINEAR = """
merge_method: linear
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: 0.5}
dtype: bfloat16
"""


def test_loads_mergekit_recipe(tmp_path):
    r = load_recipe(_write(tmp_path, LINEAR))
    assert r.merge_method == "linear"
    assert [str(s.model) for s in r.slices[0].sources] == ["a", "b"]
    assert r.dtype == "bfloat16"
    assert r.from_models


def test_set_overrides_nested_values(tmp_path):
    r = load_recipe(_write(tmp_path, LINEAR), ["models.0.parameters.weight=0.9", "dtype=float32",
                                               "parameters.normalize=false"])
    assert r.slices[0].sources[0].parameters["weight"] == 0.9
    assert r.dtype == "float32"
    assert r.parameters["normalize"] is False


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        (LINEAR + "bogus: 1\n", "bogus", "unknown key"),
        ("merge_method: nope\nmodels: [{model: a}]\n", "merge_method", "unknown merge method"),
        ("merge_method: linear\n", "models", "exactly one of"),
        (LINEAR + "slices: []\n", "models", "exactly one of"),
        (LINEAR.replace("weight: 0.5}", "weight: 0.5, densty: 0.3}", 1), "models[0].parameters.densty",
         "did you mean 'density'"),  # a name no method takes (issue #10: a known one is ignored with a warning)
        (LINEAR.replace("bfloat16", "int3"), "dtype", "unknown dtype"),
        ("merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 1]\n",
         "layer_range", "empty"),
        ("merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
         "      - model: b\n        layer_range: [0, 3]\n", "sources", "same number of layers"),
        (LINEAR + "tokenizer_source: base\ntokenizer: {source: union}\n", "tokenizer", "not both"),
        ("merge_method: linear\nmodels:\n  - model: a\n    extra: 1\n", "models[0].extra", "unknown key"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: {value: 1, filt: x}}}]\n",
         "filt", "unknown key"),
    ],
)
def test_bad_recipes_name_file_key_and_problem(tmp_path, text, key, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert path in msg and key in msg and fragment in msg
    assert "\n" not in msg


def test_method_needing_base_model(tmp_path):
    path = _write(tmp_path, "merge_method: ties\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n")
    with pytest.raises(UserError, match="needs a base_model"):
        load_recipe(path)


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "merge_method: linear\nmodels: [\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(str(tmp_path / "nope.yml"))


def test_gradients_interpolate_over_layers():
    g = [0.0, 1.0, 0.5]
    assert evaluate_setting(g, "x", 0.0, float) == 0.0
    assert evaluate_setting(g, "x", 0.25, float) == pytest.approx(0.5)
    assert evaluate_setting(g, "x", 0.5, float) == pytest.approx(1.0)
    assert evaluate_setting(g, "x", 0.75, float) == pytest.approx(0.75)
    assert evaluate_setting(g, "x", 1.0, float) == pytest.approx(0.5)


def test_filters_pick_first_match_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.7}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.3, float) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.3, float) == pytest.approx(0.3)
    assert evaluate_setting(setting, "model.norm.weight", 0.3, float) == 0.7
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0, float) is _MISSING


def test_precedence_source_over_slice_over_global():
    p = get_method("linear").param("weight")
    scopes = [{"weight": 0.1}, {"weight": 0.2}, {"weight": 0.3}]
    assert resolve(p, scopes, "t", 0.0) == 0.1
    assert resolve(p, [{}, {"weight": 0.2}, {"weight": 0.3}], "t", 0.0) == 0.2
    assert resolve(p, [{}, {}, {"weight": 0.3}], "t", 0.0) == 0.3
    # a filter that does not match falls through to the next scope
    assert resolve(p, [{"weight": [{"filter": "mlp", "value": 9}]}, {}, {"weight": 0.3}], "attn", 0.0) == 0.3


def test_hub_reference_with_revision():
    r = recipe_from_dict({"merge_method": "linear", "models": [{"model": "org/name@v1.0", "parameters": {"weight": 1}}]})
    ref = r.slices[0].sources[0].model
    assert ref.path == "org/name" and ref.revision == "v1.0"
