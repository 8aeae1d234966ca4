"""Tensors outside the layers that pack one block per layer (Gemma 3n / Gemma 4's per-layer input embedding
[vocab, layers x width] and projection [layers x width, hidden]): restacked block by block when the layers
change, each block merged as a tensor of its output layer. Hand-built checkpoints, no transformers models
(the real architectures are checked end to end in test_architectures.py)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_dir
from safetensors.torch import save_file

from ray_merge.engine import run_merge
from ray_merge.errors import UserError
from ray_merge.execute.rows import PackedRows, tensor_rows
from ray_merge.options import MergeOptions
from ray_merge.planner.architecture import packed_dim
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict

W = 2  # per-layer width
EMB, PROJ = "model.embed_tokens_per_layer.weight", "model.per_layer_model_projection.weight"


def _model(path, seed: int, layers: int = 4, width: int = W):
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(6, 3, generator=g),
         EMB: torch.randn(64, layers * width, generator=g),
         PROJ: torch.randn(layers * width, 3, generator=g),
         "model.per_layer_projection_norm.weight": torch.randn(width, generator=g),
         "model.norm.weight": torch.randn(3, generator=g)}
    for i in range(layers):
        t[f"model.layers.{i}.w.weight"] = torch.randn(3, 3, generator=g)
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["PackedTestForCausalLM"], "model_type": "packed_test", "num_hidden_layers": layers,
        "hidden_size": 3, "hidden_size_per_layer_input": width, "vocab_size": 6, "torch_dtype": "float32"}))
    return path, t


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return [_model(root / name, seed) for seed, name in enumerate("abc")]


def _merge(recipe, out, **options):
    run_merge(recipe_from_dict(recipe), str(out), MergeOptions(quiet=True, **options))
    return load_dir(out)


def _blocks(t: torch.Tensor, dim: int, idx) -> list[torch.Tensor]:
    return [t.narrow(dim, i * W, W) for i in idx]


def test_stack_restacks_blocks(models, tmp_path):
    (a, ta), (b, tb), _ = models
    got = _merge({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}, tmp_path / "out")
    for name, dim in ((EMB, 1), (PROJ, 0)):
        want = torch.cat(_blocks(ta[name], dim, range(0, 3)) + _blocks(tb[name], dim, range(1, 4)), dim)
        assert torch.equal(got[name], want), name
    # not packed (its width is one block, not layers x width): from the last slice, as any tensor after the layers
    assert torch.equal(got["model.per_layer_projection_norm.weight"], tb["model.per_layer_projection_norm.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_merged_slice_blocks_take_their_layers_parameters(models, tmp_path):
    """Block j is merged like a tensor of output layer j: its slice's sources and that layer's gradient value."""
    (a, ta), (b, tb), (c, tc) = models
    recipe = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                     {"model": str(b), "layer_range": [2, 4], "parameters": {"weight": 1.0}}]},
        {"sources": [{"model": str(c), "layer_range": [1, 2], "parameters": {"weight": 1.0}}]}]}
    got = _merge(recipe, tmp_path / "out")
    for name, dim in ((EMB, 1), (PROJ, 0)):
        (a0, _), (b2, b3), (c1,) = _blocks(ta[name], dim, (0, 1)), _blocks(tb[name], dim, (2, 3)), \
            _blocks(tc[name], dim, (1,))
        want = torch.cat([(a0 + b2) / 2, b3, c1], dim)  # layer 0: t=0, a's weight 1; layer 1: t=1, a's weight 0
        torch.testing.assert_close(got[name], want, msg=name)
    # the layers themselves agree with their blocks
    torch.testing.assert_close(got["model.layers.0.w.weight"],
                               (ta["model.layers.0.w.weight"] + tb["model.layers.2.w.weight"]) / 2)


def test_row_chunks_give_the_same_bytes(models, tmp_path):
    """Under a small memory budget the column-packed embedding is merged a few rows at a time."""
    (a, _), (b, _), _ = models
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [1, 4]}]}]}
    plan = plan_recipe(recipe_from_dict(recipe))
    from ray_merge.planner.memory import rows_per_chunk

    budget = 1000
    assert rows_per_chunk(plan.tensor(EMB), budget) not in (None, plan.tensor(EMB).shape[0])
    assert rows_per_chunk(plan.tensor(PROJ), budget) is None  # row blocks: never row-chunked
    whole = _merge(recipe, tmp_path / "whole")
    chunked = _merge(recipe, tmp_path / "chunked", memory_budget=budget)
    for name in (EMB, PROJ):
        assert torch.equal(whole[name], chunked[name]), name


class _Recording:
    """A loader that records the row ranges read."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def load_rows(self, inp, start, stop):
        self.reads.append((inp.model, start, stop))
        return self.tensors[inp.model][PROJ][start:stop]


def test_row_blocks_read_only_the_blocks_taken(models):
    (a, ta), (b, tb), _ = models
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(b), "layer_range": [3, 4]}]},
        {"sources": [{"model": str(a), "layer_range": [1, 3]}]}]}
    plan = plan_recipe(recipe_from_dict(recipe))
    pt = plan.tensor(PROJ)
    assert pt.shape == (3 * W, 3) and pt.packed.dim == 0
    by_model = {i.model: t for i, t in zip(pt.inputs, (tb, ta))}
    loader = _Recording(by_model)
    rows = tensor_rows(pt, loader)
    assert isinstance(rows, PackedRows)
    inputs = rows.whole()
    b_index, a_index = pt.inputs[0].model, pt.inputs[1].model
    assert sorted(loader.reads) == sorted([(b_index, 3 * W, 4 * W), (a_index, 1 * W, 3 * W)])  # adjacent: one read
    assert torch.equal(inputs[1][W:3 * W], ta[PROJ][W:3 * W])


def test_same_layers_of_every_model_merge_whole(models):
    """A `models:` merge keeps every layer where it is: the packed tensor is one tensor, as in mergekit."""
    (a, _), (b, _), _ = models
    plan = plan_recipe(recipe_from_dict({"merge_method": "linear", "parameters": {"weight": 1.0},
                                         "models": [{"model": str(a)}, {"model": str(b)}]}))
    assert plan.tensor(EMB).packed is None and plan.tensor(PROJ).packed is None


def test_swapped_blocks_of_one_model_are_restacked(models):
    """Every source's layers count, not only the first's: b's layers are swapped here."""
    (a, _), (b, _), _ = models
    plan = plan_recipe(recipe_from_dict({"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [2, 4]}]},
        {"sources": [{"model": str(a), "layer_range": [2, 4]}, {"model": str(b), "layer_range": [0, 2]}]}]}))
    pt = plan.tensor(EMB)
    assert [blk.blocks for blk in pt.packed.blocks] == [(0, 2), (1, 3), (2, 0), (3, 1)]


def test_different_block_widths_are_refused(models, tmp_path):
    (a, _), _, _ = models
    other, _ = _model(tmp_path / "wide", 7, width=4)
    with pytest.raises(UserError, match=r"packs blocks of 4 per layer in .*wide, not 2"):
        plan_recipe(recipe_from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(other), "layer_range": [0, 2]}]}]}))


def test_packed_dim():
    cfg = {"num_hidden_layers": 4, "hidden_size_per_layer_input": 8}
    assert packed_dim("model.embed_tokens_per_layer.weight", (128, 32), 4, cfg) == 1
    assert packed_dim("model.per_layer_model_projection.weight", (32, 64), 4, cfg) == 0
    # both dimensions are layers x width: an embedding packs its columns, a linear weight its rows
    assert packed_dim("model.embed_tokens_per_layer.weight", (32, 32), 4, cfg) == 1
    assert packed_dim("model.per_layer_model_projection.weight", (32, 32), 4, cfg) == 0
    # one block wide: not packed, though divisible by the layer count
    assert packed_dim("model.per_layer_projection_norm.weight", (8,), 4, cfg) is None
    assert packed_dim("model.per_layer_projection_norm.weight", (8,), 4, {}) == 0  # no width in the config: a guess
    nested = {"text_config": {"num_hidden_layers": 4, "hidden_size_per_layer_input": 8}}
    assert packed_dim("model.language_model.embed_tokens_per_layer.weight", (100, 32), 4, nested) == 1
    assert packed_dim("model.embed_tokens.weight", (128, 32), 4, cfg) is None
