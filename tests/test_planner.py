"""The planner on fake models: config.json and safetensors headers only, no tensor bytes on disk.

Planning reads metadata alone, so these models are sparse files whose data is never written
(and the readers fail if anything tries to read a tensor).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from ray_merge.errors import UserError
from ray_merge.execute.loaders import TensorLoader
from ray_merge.io import models as io_models
from ray_merge.planner.memory import rows_per_chunk
from ray_merge.planner.plan import plan_recipe
from ray_merge.recipe.load import recipe_from_dict

H, INTER, VOCAB = 64, 96, 1000
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}


def write_header_only(path: str, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """A safetensors file with a real header and a hole where the data goes (no bytes written)."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def fake_llama(path, layers: int = 2, vocab: int = VOCAB, dtype: str = "BF16") -> str:
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
              "hidden_size": H, "intermediate_size": INTER, "vocab_size": vocab, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    tensors = {"model.embed_tokens.weight": ((vocab, H), dtype)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = ((H, H), dtype)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = ((INTER, H), dtype)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = ((H,), dtype)
    tensors["model.norm.weight"] = ((H,), dtype)
    tensors["lm_head.weight"] = ((vocab, H), dtype)
    write_header_only(os.path.join(path, "model.safetensors"), tensors)
    return str(path)


@pytest.fixture
def no_reads(monkeypatch):
    """Any read of tensor data fails the test."""

    def fail(*a, **k):
        raise AssertionError("planning read tensor data")

    for target, attr in ((io_models.WeightReader, "read"), (io_models.WeightReader, "read_rows"),
                         (io_models, "_read_tensor"), (io_models, "_read_into_memory"),
                         (TensorLoader, "load"), (TensorLoader, "load_rows")):
        monkeypatch.setattr(target, attr, fail)


@pytest.fixture
def pair(tmp_path):
    return fake_llama(tmp_path / "a"), fake_llama(tmp_path / "b")


def _linear(a: str, b: str, **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}],
            **extra}


LAYER = ["input_layernorm.weight", "mlp.up_proj.weight", "self_attn.q_proj.weight"]


def test_plans_every_tensor_from_headers_alone(pair, no_reads):
    a, b = pair
    plan = plan_recipe(recipe_from_dict(_linear(a, b)))
    names = [t.name for t in plan.tensors]
    assert names == (["model.embed_tokens.weight"]
                     + [f"model.layers.{i}.{s}" for i in range(2) for s in LAYER]
                     + ["lm_head.weight", "model.norm.weight"])
    assert [m.path for m in plan.models] == [os.path.abspath(a), os.path.abspath(b)]
    embed = plan.tensor("model.embed_tokens.weight")
    assert embed.shape == (VOCAB, H) and embed.out_dtype == "bfloat16" and embed.compute_dtype == "float32"
    assert [(i.model, i.tensor, i.shape, i.dtype) for i in embed.inputs] == \
        [(0, embed.name, (VOCAB, H), "bfloat16"), (1, embed.name, (VOCAB, H), "bfloat16")]
    assert [mp["weight"] for mp in embed.model_params] == [0.7, 0.3]
    assert embed.row_remap is None
    assert plan.tensor("model.layers.1.mlp.up_proj.weight").shape == (INTER, H)
    # working set: both bf16 inputs, then (2 inputs + linear's 2 workspace tensors) in float32
    numel = VOCAB * H
    assert embed.in_bytes == 2 * numel * 2 and embed.out_bytes == numel * 2
    assert embed.working_bytes == 2 * numel * 2 + numel * 4 * (2 + 2)
    assert plan.peak_working_bytes == embed.working_bytes
    assert plan.bytes_read == sum(t.in_bytes for t in plan.tensors)
    assert plan.out_config["num_hidden_layers"] == 2 and plan.out_config["torch_dtype"] == "bfloat16"


def test_shard_layout(pair, no_reads):
    a, b = pair
    limit = 3 * H * H * 2  # bytes: a few layer tensors, less than one embedding
    plan = plan_recipe(recipe_from_dict(_linear(a, b)), out_shard_bytes=limit)
    n = len(plan.shards)
    assert n > 2
    assert [s.index for s in plan.shards] == list(range(n))
    assert [s.filename for s in plan.shards] == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    # the shards cut the tensors, in plan order, each within the limit unless one tensor alone exceeds it
    assert [name for s in plan.shards for name in s.tensors] == [t.name for t in plan.tensors]
    for s in plan.shards:
        tensors = plan.shard_tensors(s)
        assert all(t.shard == s.index for t in tensors)
        assert s.nbytes == sum(t.out_bytes for t in tensors)
        assert s.nbytes <= limit or len(tensors) == 1
    assert plan.bytes_written == sum(t.out_bytes for t in plan.tensors)


def test_planned_tensors_are_immutable_and_the_recipe_unchanged(pair, no_reads):
    a, b = pair
    recipe = recipe_from_dict(_linear(a, b, base_model=a))
    before = copy.deepcopy(recipe)
    plan = plan_recipe(recipe)
    assert recipe == before  # `models:` sources keep layer_range None: the planner filled in a copy
    assert all(src.layer_range is None for sl in recipe.slices for src in sl.sources)
    pt = plan.tensors[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pt.shape = (1,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards[0].nbytes = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        pt.inputs[0].tensor = "x"


def test_frankenmerge_slices_renumber_layers(tmp_path, no_reads):
    a, b = fake_llama(tmp_path / "a", layers=3), fake_llama(tmp_path / "b", layers=3)
    recipe = recipe_from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [1, 3]}]},
    ]})
    plan = plan_recipe(recipe)
    assert plan.out_config["num_hidden_layers"] == 4
    q = [t for t in plan.tensors if t.name.endswith("q_proj.weight")]
    assert [t.name for t in q] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]
    assert [(t.inputs[0].model, t.inputs[0].tensor) for t in q] == [
        (0, "model.layers.0.self_attn.q_proj.weight"), (0, "model.layers.1.self_attn.q_proj.weight"),
        (1, "model.layers.1.self_attn.q_proj.weight"), (1, "model.layers.2.self_attn.q_proj.weight")]
    # embeddings from the first slice, the head and final norm from the last
    assert plan.tensor("model.embed_tokens.weight").inputs[0].model == 0
    assert plan.tensor("lm_head.weight").inputs[0].model == 1


def test_row_chunks_decided_from_the_plan(pair, no_reads):
    a, b = pair
    plan = plan_recipe(recipe_from_dict(_linear(a, b)))
    embed = plan.tensor("model.embed_tokens.weight")
    assert rows_per_chunk(embed, None) is None and rows_per_chunk(embed, embed.working_bytes) is None
    rows = rows_per_chunk(embed, embed.working_bytes // 10)
    assert rows is not None and 0 < rows <= VOCAB // 10


def test_differing_vocabularies_need_tokenizer_settings(tmp_path, no_reads):
    a, b = fake_llama(tmp_path / "a"), fake_llama(tmp_path / "b", vocab=VOCAB + 2)
    with pytest.raises(UserError, match="different shapes.*tokenizer"):
        plan_recipe(recipe_from_dict(_linear(a, b)))


def test_header_only_files_hold_no_data(tmp_path):
    path = fake_llama(tmp_path / "a")
    st = os.stat(os.path.join(path, "model.safetensors"))
    assert st.st_blocks * 512 < 64 * 1024 < st.st_size  # sparse: the data was never written
    index = io_models.index_weights(path, "a")
    assert index["lm_head.weight"].shape == (VOCAB, H) and index["lm_head.weight"].dtype == torch.bfloat16
