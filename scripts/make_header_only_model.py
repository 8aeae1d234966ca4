"""Write a header-only Llama-shaped model directory: config.json, sharded safetensors files with real headers and
a hole where the tensor data goes, and model.safetensors.index.json.

The files are sparse (made with truncate): a 141 GB Llama-3-70B takes a few kilobytes of disk. They hold no
tensor data, so they are only good for what reads metadata alone: `ray-merge plan`.

    python scripts/make_header_only_model.py /tmp/m70b/base                       # Llama-3-70B, bf16, ~5 GB shards
    python scripts/make_header_only_model.py /tmp/m70b/base /tmp/m70b/ft0 /tmp/m70b/ft1 /tmp/m70b/ft2
    python scripts/make_header_only_model.py /tmp/tiny --hidden 64 --intermediate 96 --layers 2 --heads 4 \\
        --kv-heads 2 --vocab 1000 --shard-size 100000

Only the standard library is used, so it starts fast.
"""
from __future__ import annotations

import argparse
import json
import os

# Llama-3-70B (meta-llama/Meta-Llama-3-70B)
LLAMA3_70B = {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256}
HUB_SHARD_BYTES = 5_000_000_000  # the hub's shards: at most ~5 GB each
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def llama_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama model with untied embeddings, in the hub's order."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def llama_config(shape: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
        "vocab_size": shape["vocab"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": TORCH_DTYPE[dtype],
    }


def write_header_only_file(path: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str) -> int:
    """One safetensors file: its header, then a hole of the data's size. Returns the data's size in bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no data block is written
    return offset


def split_shards(tensors: list[tuple[str, tuple[int, ...]]], dtype: str, shard_bytes: int) -> list[list]:
    """Tensors, in order, cut into files of at most ``shard_bytes`` (a larger tensor gets a file of its own)."""
    groups: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def write_model(path: str, shape: dict, dtype: str = "BF16", shard_bytes: int = HUB_SHARD_BYTES) -> int:
    """A header-only model directory at ``path``. Returns the model's size in bytes (as its tensors)."""
    os.makedirs(path, exist_ok=True)
    groups = split_shards(llama_tensors(shape), dtype, shard_bytes)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        filename = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_header_only_file(os.path.join(path, filename), group, dtype)
        weight_map.update((name, filename) for name, _ in group)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llama_config(shape, dtype), f, indent=2)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="+", help="model directories to write (the same model in each)")
    for key, value in LLAMA3_70B.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, help=f"default {value} (Llama-3-70B)")
    ap.add_argument("--dtype", default="BF16", choices=sorted(ITEMSIZE))
    ap.add_argument("--shard-size", type=int, default=HUB_SHARD_BYTES, help="max bytes per file (default 5e9)")
    args = ap.parse_args(argv)
    shape = {key: getattr(args, key) for key in LLAMA3_70B}
    for path in args.out:
        total = write_model(path, shape, args.dtype, args.shard_size)
        print(f"{path}: {total / 1e9:.1f} GB of tensors (sparse, header only)")


if __name__ == "__main__":
    main()
