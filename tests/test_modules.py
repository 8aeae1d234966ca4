"""`modules:` recipes (mergekit's multi-module form) on a tiny Qwen2-VL: a text decoder, a vision tower and a
projector (``visual.merger``), each merged with its own models / slices / parameters.

- linear: the text decoder with a weight gradient over its 4 layers, the vision tower with module-level and
  per-model weights, the projector not listed (copied from the first model); every tensor checked;
- a frankenmerge of both stacks via module slices: ``text_config.num_hidden_layers`` and ``vision_config.depth``
  rewritten, every tensor from the right layer, and the output loads with no missing or unexpected keys;
- the same linear recipe through mergekit (it knows Qwen2-VL): equal on every tensor it writes (it drops the
  modules a recipe does not list; we copy them);
- bad `modules:` input: one line naming the file and key, exit code 2;
- encoder-decoder models (tiny T5 against mergekit's t5 definition; tiny Whisper against an independent
  computation): one module a frankenmerge by slices, the other a linear weight gradient, both ways round.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from conftest import load_dir, mergekit_venv, run_cli, write_recipe

from ray_merge.errors import UserError
from ray_merge.options import MergeOptions
from ray_merge.planner.architecture import infer_layout
from ray_merge.planner.modules import infer_modules
from ray_merge.recipe.load import recipe_from_dict

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText

transformers.logging.set_verbosity_error()

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, vocab_size=128, max_position_embeddings=128)
VISION = dict(hidden_size=32, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2, out_hidden_size=32,
              patch_size=14, spatial_merge_size=2)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """Two tiny Qwen2-VL models: one random model and two perturbed copies (every tensor differs)."""
    root = tmp_path_factory.mktemp("vl")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2_vl", text_config=TEXT, vision_config=VISION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(root / "orig", safe_serialization=True)
    paths = []
    for seed, name in ((1, "a"), (2, "b")):
        shutil.copytree(root / "orig", root / name)
        gen = torch.Generator().manual_seed(seed)
        for f in os.listdir(root / name):
            if f.endswith(".safetensors"):
                tensors = load_file(root / name / f)
                tensors = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in tensors.items()}
                save_file(tensors, root / name / f, metadata={"format": "pt"})
        paths.append(root / name)
    return paths


def _merge(recipe: dict, out) -> None:
    from ray_merge.engine import run_merge

    run_merge(recipe_from_dict(recipe), str(out), MergeOptions(quiet=True))


def _is_text_layer(name):
    return name.startswith("model.layers.")


def test_modules_found(vl):
    a = load_dir(vl[0])
    config = json.load(open(vl[0] / "config.json"))
    names = sorted(a)
    modules = infer_modules(names, config, infer_layout(names, config, "a"))
    assert set(modules) == {"text_decoder", "vision_tower", "multi_modal_projector"}
    text, vision, proj = modules["text_decoder"], modules["vision_tower"], modules["multi_modal_projector"]
    assert (text.layout.prefix, text.layout.num_layers, text.count_key) == (
        "model.layers", 4, "text_config.num_hidden_layers")
    assert (vision.layout.prefix, vision.layout.num_layers, vision.count_key) == ("visual.blocks", 2,
                                                                                  "vision_config.depth")
    assert vision.layout.pre == ("visual.patch_embed.proj.weight",)
    assert proj.layout.num_layers == 0 and not proj.layout.post
    assert proj.layout.pre and all(n.startswith("visual.merger.") for n in proj.layout.pre)
    assert set(text.layout.pre + text.layout.post) == {"model.embed_tokens.weight", "model.norm.weight",
                                                       "lm_head.weight"}
    counted = sum(len(m.layout.pre) + len(m.layout.post) + sum(len(m.layout.suffixes(i))
                                                               for i in range(m.layout.num_layers))
                  for m in modules.values())
    assert counted == len(names)  # every tensor in exactly one module


LINEAR = {
    "merge_method": "linear",
    "modules": {
        "text_decoder": {"models": [
            {"model": "A", "parameters": {"weight": [1.0, 0.0]}},  # a gradient over the text layers
            {"model": "B", "parameters": {"weight": [0.0, 1.0]}},
        ]},
        "vision_tower": {
            "models": [{"model": "A"}, {"model": "B", "parameters": {"weight": 0.75}}],
            "parameters": {"weight": 0.5},  # the module's: A's weight
        },
    },
    "parameters": {"normalize": True},
    "dtype": "float32",
}


FRANKEN = {
    "merge_method": "passthrough",
    "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": "A", "layer_range": [0, 3]}]},
                                    {"sources": [{"model": "B", "layer_range": [1, 4]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": "B", "layer_range": [0, 2]}]},
                                    {"sources": [{"model": "A", "layer_range": [1, 2]}]}]},
    },
    "dtype": "float32",
}


def _recipe(vl, recipe=LINEAR) -> dict:
    text = json.dumps(recipe).replace('"A"', json.dumps(str(vl[0]))).replace('"B"', json.dumps(str(vl[1])))
    return json.loads(text)


def _linear_recipe(vl) -> dict:
    return _recipe(vl, LINEAR)


def _expected_linear(name, a, b):
    if _is_text_layer(name):
        t = int(name.split(".")[2]) / 3
        return (1 - t) * a + t * b
    if name.startswith("visual.merger."):
        return a  # not in the recipe: copied from the first model
    if name.startswith("visual."):
        return (0.5 * a + 0.75 * b) / 1.25
    return a  # text tensors outside the layers: t = 0


def test_linear_per_module(vl, tmp_path):
    _merge(_linear_recipe(vl), tmp_path / "out")
    a, b, out = load_dir(vl[0]), load_dir(vl[1]), load_dir(tmp_path / "out")
    assert set(out) == set(a)
    for name in a:
        torch.testing.assert_close(out[name], _expected_linear(name, a[name], b[name]), msg=name)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["text_config"]["num_hidden_layers"] == 4 and cfg["vision_config"]["depth"] == 2


def test_frankenmerge_by_module_slices(vl, tmp_path):
    recipe = _recipe(vl, FRANKEN)
    _merge(recipe, tmp_path / "out")
    a, b, out = load_dir(vl[0]), load_dir(vl[1]), load_dir(tmp_path / "out")
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["text_config"]["num_hidden_layers"] == 6
    assert len(cfg["text_config"]["layer_types"]) == 6
    assert cfg["vision_config"]["depth"] == 3
    text_from = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    vision_from = [(b, 0), (b, 1), (a, 1)]
    expected = {}
    for name in a:
        parts = name.split(".")
        if _is_text_layer(name):
            for j, (src, i) in enumerate(text_from):
                expected[".".join(parts[:2] + [str(j)] + parts[3:])] = src[".".join(parts[:2] + [str(i)] + parts[3:])]
        elif name.startswith("visual.blocks."):
            for j, (src, i) in enumerate(vision_from):
                expected[".".join(parts[:2] + [str(j)] + parts[3:])] = src[".".join(parts[:2] + [str(i)] + parts[3:])]
        elif name == "model.embed_tokens.weight":
            expected[name] = a[name]  # before the layers: the first slice's model
        elif name.startswith("model.") or name.startswith("lm_head"):
            expected[name] = b[name]  # after the layers: the last slice's model
        elif name == "visual.patch_embed.proj.weight":
            expected[name] = b[name]  # the vision tower's first slice
        else:
            expected[name] = a[name]  # the projector, not listed: the first model's
    assert set(out) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert len(model.model.language_model.layers) == 6 and len(model.model.visual.blocks) == 3


@pytest.mark.parametrize("recipe", [LINEAR, FRANKEN], ids=["linear", "frankenmerge"])
def test_same_as_mergekit(vl, tmp_path, recipe):
    """mergekit's Qwen2-VL definition reads the text layer count at the top level of config.json, as the hub's
    Qwen2-VL configs (written by older transformers) have it: the models are copied with it added."""
    venv = mergekit_venv()
    flat = []
    for path in vl:
        shutil.copytree(path, tmp_path / path.name)
        cfg = json.load(open(path / "config.json"))
        cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"]
        json.dump(cfg, open(tmp_path / path.name / "config.json", "w"))
        flat.append(tmp_path / path.name)
    vl = flat
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(_recipe(vl, recipe)))
    proc = subprocess.run([os.path.join(venv, "bin", "mergekit-yaml"), str(recipe_path), str(tmp_path / "mk"),
                           "--no-lazy-unpickle"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _merge(_recipe(vl, recipe), tmp_path / "ours")
    mk, ours = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours")
    mk_cfg, our_cfg = (json.load(open(tmp_path / d / "config.json")) for d in ("mk", "ours"))
    assert mk_cfg["num_hidden_layers"] == our_cfg["num_hidden_layers"] == our_cfg["text_config"]["num_hidden_layers"]
    assert mk_cfg["vision_config"]["depth"] == our_cfg["vision_config"]["depth"]
    assert not any(n.startswith("visual.merger.") for n in mk)  # mergekit drops the unlisted projector
    assert set(mk) == {n for n in ours if not n.startswith("visual.merger.")}
    for name in mk:
        torch.testing.assert_close(ours[name], mk[name], msg=name)


@pytest.mark.parametrize("modules, key", [
    ({"text_decoder": {"models": ["A"], "slices": []}}, "modules.text_decoder"),
    ({"text_decoder": {"models": ["A"], "weight": 1}}, "modules.text_decoder.weight"),
    ({"text_decoder": {"models": [{"model": "A", "parameters": {"wieght": 1}}]}},
     "modules.text_decoder.models[0].parameters.wieght"),
    ({"text_decoder": {"slices": [{"sources": [{"model": "A", "layer_range": [0, 9]}]}]}},
     "modules.text_decoder.slices[0].sources[0].layer_range"),
    ({"vision": {"models": ["A"]}}, "modules.vision"),
    ([], "modules"),
])
def test_bad_modules_input(vl, tmp_path, modules, key):
    data = {"merge_method": "passthrough", "modules": modules}
    text = json.dumps(data).replace('"A"', json.dumps(str(vl[0])))
    path = write_recipe(tmp_path / "bad.yml", text)
    proc = run_cli("run", path, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and f"bad.yml: {key}:" in lines[0], proc.stderr


def test_modules_and_models_together_refused():
    with pytest.raises(UserError, match="exactly one of 'models', 'slices' or 'modules'"):
        recipe_from_dict({"merge_method": "linear", "models": ["a"], "modules": {"text_decoder": {"models": ["a"]}}})


# --- Gemma 3 (SigLIP vision tower, a projector with no layers, per-layer fields under text_config) -------------

G3_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               num_hidden_layers=4, vocab_size=300, max_position_embeddings=128, sliding_window=4,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])
G3_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                 patch_size=14, vision_use_head=False)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Two tiny Gemma 3 image-text models under the hub's tensor names (``language_model.model.layers.N``,
    ``vision_tower.vision_model.encoder.layers.N``, ``multi_modal_projector.*``), as mergekit knows them."""
    root = tmp_path_factory.mktemp("gemma3")
    cfg = AutoConfig.for_model("gemma3", text_config=G3_TEXT, vision_config=G3_VISION, mm_tokens_per_image=4,
                               image_token_index=299, boi_token_index=297, eoi_token_index=298)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        path = root / f"g{seed}"
        model.save_pretrained(path, safe_serialization=True)
        tensors = {}
        for f in [f for f in os.listdir(path) if f.endswith(".safetensors")]:
            tensors.update(load_file(path / f))
            os.remove(path / f)
        gen = torch.Generator().manual_seed(seed)
        tensors = {("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.")
                    else k): v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in tensors.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        paths.append(path)
    return paths


G3_RECIPE = {
    "merge_method": "linear",
    "parameters": {"weight": 1.0},
    "dtype": "float32",
    "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": "A", "layer_range": [0, 3]}]},
                                    {"sources": [{"model": "B", "layer_range": [1, 4]}]}]},
        "vision_tower": {"models": [{"model": "A", "parameters": {"weight": 0.25}},
                                    {"model": "B", "parameters": {"weight": 0.75}}]},
        "multi_modal_projector": {"models": [{"model": "A", "parameters": {"weight": 0.3}},
                                             {"model": "B", "parameters": {"weight": 0.7}}]},
    },
}


def test_gemma3_modules_same_as_mergekit(gemma3, tmp_path):
    """A text frankenmerge, a merged vision tower and a merged projector (a module with no layers), against
    mergekit's gemma3vl definition; our config also has text_config.layer_types stacked, and loads."""
    recipe = _recipe(gemma3, G3_RECIPE)
    modules = infer_modules(sorted(load_dir(gemma3[0])), json.load(open(gemma3[0] / "config.json")),
                            infer_layout(sorted(load_dir(gemma3[0])), json.load(open(gemma3[0] / "config.json")), "a"))
    assert modules["multi_modal_projector"].layout.num_layers == 0
    assert modules["vision_tower"].count_key == "vision_config.num_hidden_layers"
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(recipe))
    proc = subprocess.run([os.path.join(mergekit_venv(), "bin", "mergekit-yaml"), str(recipe_path),
                           str(tmp_path / "mk"), "--no-lazy-unpickle"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _merge(recipe, tmp_path / "ours")
    mk, ours, a, b = load_dir(tmp_path / "mk"), load_dir(tmp_path / "ours"), load_dir(gemma3[0]), load_dir(gemma3[1])
    assert set(mk) == set(ours)
    for name in mk:
        torch.testing.assert_close(ours[name], mk[name], msg=name)
    proj = "multi_modal_projector.mm_input_projection_weight"
    torch.testing.assert_close(ours[proj], 0.3 * a[proj] + 0.7 * b[proj])  # merged, not copied
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    mk_cfg = json.load(open(tmp_path / "mk" / "config.json"))
    assert cfg["text_config"]["num_hidden_layers"] == mk_cfg["text_config"]["num_hidden_layers"] == 6
    s, f = "sliding_attention", "full_attention"
    assert cfg["text_config"]["layer_types"] == [s, f, s, f, s, s]  # layers 0-2 of A, then 1-3 of B
    assert cfg["vision_config"]["num_hidden_layers"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert [layer.self_attn.layer_type for layer in model.model.language_model.layers] == [s, f, s, f, s, s]


@pytest.mark.parametrize("form", ["one_slice", "two_slices"])
def test_slices_of_a_module_without_layers(gemma3, tmp_path, form):
    """A projector (no layers) given as slices: its tensors come from the first slice's sources, as in
    mergekit (which writes `layer_range: [0, 0]` for it); the same as its `models:` form."""
    a_src = {"model": "A", "parameters": {"weight": 0.3}}
    b_src = {"model": "B", "parameters": {"weight": 0.7}}
    if form == "one_slice":
        slices = [{"sources": [{**a_src, "layer_range": [0, 0]}, {**b_src, "layer_range": [0, 0]}]}]
    else:
        slices = [{"sources": [{**a_src, "layer_range": [0, 0]}, {**b_src, "layer_range": [0, 0]}]},
                  {"sources": [{"model": "B", "layer_range": [0, 0]}]}]
    recipe = {"merge_method": "linear", "dtype": "float32",
              "modules": {"multi_modal_projector": {"slices": slices}}}
    _merge(_recipe(gemma3, recipe), tmp_path / "out")
    a, b, out = load_dir(gemma3[0]), load_dir(gemma3[1]), load_dir(tmp_path / "out")
    assert set(out) == set(a)
    for name in a:
        if name.startswith("multi_modal_projector."):
            torch.testing.assert_close(out[name], 0.3 * a[name] + 0.7 * b[name], msg=name)
        else:
            assert torch.equal(out[name], a[name]), name  # modules not listed: the first model's
    bad = {"merge_method": "linear", "modules": {"multi_modal_projector": {"slices": [
        {"sources": [{"model": "A", "layer_range": [0, 1]}]}]}}}
    with pytest.raises(UserError, match=r"\[0, 1\] is out of range: module multi_modal_projector of .* has 0 layers"):
        _merge(_recipe(gemma3, bad), tmp_path / "bad")
    empty = {"merge_method": "linear", "modules": {"text_decoder": {"slices": [
        {"sources": [{"model": "A", "layer_range": [2, 2]}]}]}}}
    with pytest.raises(UserError, match=r"\[2, 2\] is empty: module text_decoder of .* has 4 layers"):
        _merge(_recipe(gemma3, empty), tmp_path / "bad")
    with pytest.raises(UserError, match=r"slices\[0\].sources\[0\].layer_range: \[0, 0\] is empty"):
        recipe_from_dict({"merge_method": "linear", "slices": [{"sources": [{"model": "x", "layer_range": [0, 0]}]}]})


def test_flat_config_text_fields_follow_the_layers():
    """A flat config (the text layer count at the top level, repeated in text_config): the per-layer lists
    under text_config are stacked too."""
    from ray_merge.planner.layer_config import layer_values, stack_layer_fields

    s, f = "sliding_attention", "full_attention"
    cfg = {"model_type": "gemma3", "num_hidden_layers": 4,
           "text_config": {"model_type": "gemma3_text", "num_hidden_layers": 4, "layer_types": [s, f, s, s]},
           "vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 2}}
    values = layer_values(cfg)
    assert values["text_config.layer_types"] == [s, f, s, s]
    out = stack_layer_fields(cfg, values, [(values, 0), (values, 1), (values, 1), (values, 3)], list("wxyz"))
    assert out["num_hidden_layers"] == out["text_config"]["num_hidden_layers"] == 4
    assert out["text_config"]["layer_types"] == [s, f, f, s]
    assert out["vision_config"] == cfg["vision_config"]
    out = stack_layer_fields(cfg, values, [(values, 1), (values, 2)], ["x", "y"])
    assert out["num_hidden_layers"] == out["text_config"]["num_hidden_layers"] == 2
    assert out["text_config"]["layer_types"] == [f, s]


# ---------------------------------------------------------------------------
# An encoder-decoder model (T5): mergekit's t5 definition has `encoder` and `decoder` modules
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """Two tiny T5 models (3 encoder blocks, 2 decoder blocks; embeddings tied, so only `shared.weight`),
    every tensor perturbed so that no two models agree anywhere (norms included)."""
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("t5")
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"t{seed}"
        T5ForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
        tensors = {}
        for f in [f for f in os.listdir(path) if f.endswith(".safetensors")]:
            tensors.update(load_file(path / f))
            os.remove(path / f)
        gen = torch.Generator().manual_seed(seed + 10)
        save_file({k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in tensors.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
        paths.append(path)
    return paths


_GRADIENT = {"models": [{"model": "A", "parameters": {"weight": [0.2, 0.8]}},
                        {"model": "B", "parameters": {"weight": 0.5}}]}
_T5_FRANKEN = {  # module -> slices of (model, layer range)
    "encoder": [("A", [0, 2]), ("B", [1, 3])],  # 4 blocks: A0 A1 B1 B2
    "decoder": [("A", [0, 2]), ("B", [1, 2])],  # 3 blocks: A0 A1 B1
}


@pytest.mark.parametrize("franken", ["encoder", "decoder"])
def test_t5_encoder_decoder_modules_same_as_mergekit(t5, tmp_path, franken):
    """One module a frankenmerge by slices, the other a linear merge with a weight gradient over its layers,
    through `ray-merge run`; every tensor against an independent computation and against mergekit (which
    writes no `shared.weight`: its t5 definition names only the tied `*.embed_tokens.weight`); the config's
    `num_layers` / `num_decoder_layers` rewritten; the output loads in transformers and runs."""
    from transformers import T5ForConditionalGeneration

    linear = "decoder" if franken == "encoder" else "encoder"
    modules = infer_modules(sorted(load_dir(t5[0])), json.load(open(t5[0] / "config.json")),
                            infer_layout(sorted(load_dir(t5[0])), json.load(open(t5[0] / "config.json")), "a"))
    assert set(modules) == {"encoder", "decoder"}
    assert (modules["encoder"].count_key, modules["encoder"].layout.num_layers) == ("num_layers", 3)
    assert (modules["decoder"].count_key, modules["decoder"].layout.num_layers) == ("num_decoder_layers", 2)

    recipe = _recipe(t5, {
        "merge_method": "linear", "parameters": {"weight": 1.0}, "dtype": "float32",
        "modules": {franken: {"slices": [{"sources": [{"model": m, "layer_range": r}]}
                                         for m, r in _T5_FRANKEN[franken]]},
                    linear: _GRADIENT}})
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(recipe))
    proc = run_cli("run", recipe_path, tmp_path / "ours", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b, out = load_dir(t5[0]), load_dir(t5[1]), load_dir(tmp_path / "ours")

    n_linear = {"encoder": 3, "decoder": 2}[linear]
    stack = [(m, i) for m, (lo, hi) in _T5_FRANKEN[franken] for i in range(lo, hi)]
    src = {"A": a, "B": b}

    def lerp(name, t):  # the gradient module: A's weight 0.2 -> 0.8 over its layers, B's 0.5
        w = 0.2 + 0.6 * t
        return (w * a[name] + 0.5 * b[name]) / (w + 0.5)

    expected = {}
    for i in range(n_linear):
        for name in [n for n in a if n.startswith(f"{linear}.block.{i}.")]:
            expected[name] = lerp(name, i / (n_linear - 1))
    expected[f"{linear}.final_layer_norm.weight"] = lerp(f"{linear}.final_layer_norm.weight", 0.0)  # t = 0
    for j, (m, i) in enumerate(stack):
        for name in [n for n in a if n.startswith(f"{franken}.block.{i}.")]:
            expected[name.replace(f".block.{i}.", f".block.{j}.", 1)] = src[m][name]
    expected[f"{franken}.final_layer_norm.weight"] = src[stack[-1][0]][f"{franken}.final_layer_norm.weight"]
    # the tied embeddings are the decoder's first tensor: its first slice (A) or the gradient's t = 0
    expected["shared.weight"] = a["shared.weight"] if franken == "decoder" else lerp("shared.weight", 0.0)
    assert set(out) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    assert sum(".relative_attention_bias." in n for n in out) == 2  # block 0 of each stack only

    mk_proc = subprocess.run([os.path.join(mergekit_venv(), "bin", "mergekit-yaml"), str(recipe_path),
                              str(tmp_path / "mk"), "--no-lazy-unpickle"], capture_output=True, text=True,
                             timeout=600)
    assert mk_proc.returncode == 0, mk_proc.stderr[-2000:]
    mk = load_dir(tmp_path / "mk")
    assert set(mk) == set(out) - {"shared.weight"}
    for name in mk:
        torch.testing.assert_close(out[name], mk[name], msg=name)

    counts = {"encoder": 3, "decoder": 2, franken: len(stack)}
    for d in (tmp_path / "ours", tmp_path / "mk"):
        cfg = json.load(open(d / "config.json"))
        assert (cfg["num_layers"], cfg["num_decoder_layers"]) == (counts["encoder"], counts["decoder"]), d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (len(model.encoder.block), len(model.decoder.block)) == (counts["encoder"], counts["decoder"])
    torch.testing.assert_close(model.lm_head.weight, out["shared.weight"])
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits
    assert logits.shape == (1, 2, 64) and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """Two tiny Whisper models (3 encoder layers, 2 decoder layers), every tensor perturbed."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("whisper")
    cfg = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=16, decoder_start_token_id=1,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[])
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"w{seed}"
        WhisperForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
        tensors = load_file(path / "model.safetensors")
        gen = torch.Generator().manual_seed(seed + 10)
        save_file({k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in tensors.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
        paths.append(path)
    return paths


@pytest.mark.parametrize("franken", ["encoder", "decoder"])
def test_whisper_encoder_decoder_modules(whisper, tmp_path, franken):
    """The T5 recipes on Whisper (`model.encoder.layers.N`, `model.decoder.layers.N`; counts `encoder_layers` /
    `decoder_layers`), against an independent computation only: mergekit's whisper definition cannot run (its
    decoder prefix lacks a dot: `model.decoderembed_tokens.weight`). The input convolutions and position
    embeddings come from the first slice, the final layer norm from the last."""
    from transformers import WhisperForConditionalGeneration

    linear = "decoder" if franken == "encoder" else "encoder"
    recipe = _recipe(whisper, {
        "merge_method": "linear", "parameters": {"weight": 1.0}, "dtype": "float32",
        "modules": {franken: {"slices": [{"sources": [{"model": m, "layer_range": r}]}
                                         for m, r in _T5_FRANKEN[franken]]},
                    linear: _GRADIENT}})
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(recipe))
    proc = run_cli("run", recipe_path, tmp_path / "ours", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b, out = load_dir(whisper[0]), load_dir(whisper[1]), load_dir(tmp_path / "ours")
    src = {"A": a, "B": b}
    n_linear = {"encoder": 3, "decoder": 2}[linear]
    stack = [(m, i) for m, (lo, hi) in _T5_FRANKEN[franken] for i in range(lo, hi)]

    def lerp(name, t):
        w = 0.2 + 0.6 * t
        return (w * a[name] + 0.5 * b[name]) / (w + 0.5)

    expected = {}
    for name in [n for n in a if n.startswith(f"model.{linear}.")]:
        parts = name.split(".")
        expected[name] = lerp(name, int(parts[3]) / (n_linear - 1) if parts[2] == "layers" else 0.0)
    for name in [n for n in a if n.startswith(f"model.{franken}.") and ".layers." not in n]:
        expected[name] = src[stack[-1 if ".layer_norm." in name else 0][0]][name]
    for j, (m, i) in enumerate(stack):
        for name in [n for n in a if n.startswith(f"model.{franken}.layers.{i}.")]:
            expected[name.replace(f".layers.{i}.", f".layers.{j}.", 1)] = src[m][name]
    assert set(out) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, msg=name)
    counts = {"encoder": 3, "decoder": 2, franken: len(stack)}
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert (cfg["encoder_layers"], cfg["decoder_layers"]) == (counts["encoder"], counts["decoder"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = WhisperForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (len(model.model.encoder.layers), len(model.model.decoder.layers)) == (counts["encoder"],
                                                                                   counts["decoder"])
    logits = model(input_features=torch.randn(1, 8, 32), decoder_input_ids=torch.tensor([[1, 3]])).logits
    assert logits.shape == (1, 2, 64) and torch.isfinite(logits).all()
