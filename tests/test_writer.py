"""The streaming shard writer produces files the safetensors library reads back exactly."""
import pytest
import torch
from safetensors import safe_open

from ray_merge.io.writer import ShardWriter, checksum_file


def test_roundtrip_all_dtypes_and_odd_strides(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.f32.transposed_col": torch.randn(4, 6, generator=g).t()[:, :1],  # non-contiguous, last dim 1
        "c.f16": torch.randn(3, generator=g).half(),
        "d.i64": torch.arange(5),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 3),
        "g.bool": torch.tensor([True, False, True]),
    }
    path = tmp_path / "x.safetensors"
    w = ShardWriter(str(path), [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    digest = w.close()
    assert not (tmp_path / "x.safetensors.tmp").exists()
    assert digest == checksum_file(str(path))
    with safe_open(str(path), "pt") as h:
        assert set(h.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(h.get_tensor(k), v), k


def test_rows_written_in_chunks_equal_whole(tmp_path):
    t = torch.randn(10, 4)
    w = ShardWriter(str(tmp_path / "r.safetensors"), [("t", (10, 4), "float32")])
    for s in range(0, 10, 3):
        w.write_rows("t", t[s:s + 3])
    w.close()
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as h:
        assert torch.equal(h.get_tensor("t"), t)


def test_wrong_tensor_order_is_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "o.safetensors"), [("a", (2,), "float32"), ("b", (2,), "float32")])
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_unfinished_shard_never_appears(tmp_path):
    w = ShardWriter(str(tmp_path / "u.safetensors"), [("a", (2,), "float32"), ("b", (2,), "float32")])
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()
    assert not (tmp_path / "u.safetensors").exists()
