"""Reading input tensors: copy-on-write maps of safetensors files, and the plain-read fallback."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from ray_merge.io import models
from ray_merge.io.models import WeightReader, index_weights
from ray_merge.methods import _random


def _write_model(tmp_path):
    tensors = {
        "bf16": torch.randn(37, 11).to(torch.bfloat16),
        "f32": torch.randn(5, 3, 2),
        "i64": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(3000, 700),  # spans many pages, at an offset that is not page-aligned
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_reads_equal_safetensors_and_never_write_the_file(tmp_path):
    path, tensors = _write_model(tmp_path)
    before = path.read_bytes()
    reader = WeightReader(index_weights(str(tmp_path), "m"))
    for name, want in load_file(str(path)).items():
        got = reader.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), name
        if got.numel():
            got.view(-1)[0] = 1  # writable: a private copy of the page, not the file
    assert path.read_bytes() == before
    assert torch.equal(reader.read("big"), tensors["big"])


def test_plain_read_fallback_matches(tmp_path):
    path, tensors = _write_model(tmp_path)
    index = index_weights(str(tmp_path), "m")
    for name, want in tensors.items():
        assert torch.equal(models._read_into_memory(index[name]), want), name


def test_dare_mask_is_independent_of_thread_count():
    seed = [123, 456]
    n = 3 * (1 << 20) + 12345  # several blocks and a partial one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _random.bernoulli_mask(n, 0.3, seed)
        torch.set_num_threads(max(2, threads))
        many = _random.bernoulli_mask(n, 0.3, seed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert abs(one.float().mean().item() - 0.3) < 0.002  # ~3.2M draws: sd 0.00026
    assert not torch.equal(one, _random.bernoulli_mask(n, 0.3, [123, 457]))
    assert _random.bernoulli_mask(10, 1.0, seed).all() and not _random.bernoulli_mask(10, 0.0, seed).any()


def test_read_rows_reads_only_those_rows(tmp_path, monkeypatch):
    path, tensors = _write_model(tmp_path)
    reader = WeightReader(index_weights(str(tmp_path), "m"))
    monkeypatch.setattr(models, "_read_tensor", lambda *a: (_ for _ in ()).throw(AssertionError("mapped whole")))
    for name, (a, b) in (("big", (1234, 1300)), ("bf16", (0, 37)), ("f32", (2, 9)), ("bf16", (5, 5))):
        got = reader.read_rows(name, a, b)
        assert torch.equal(got, tensors[name][a:b]), name
    # a range in the middle of a tensor is read alone: the bytes before and after may be garbage
    meta = reader.index["big"]
    row = meta.nbytes // meta.shape[0]
    data = bytearray(path.read_bytes())
    data[meta.offset:meta.offset + 1234 * row] = b"\xff" * (1234 * row)
    data[meta.offset + 1300 * row:meta.offset + meta.nbytes] = b"\xff" * (meta.nbytes - 1300 * row)
    path.write_bytes(bytes(data))
    assert torch.equal(reader.read_rows("big", 1234, 1300), tensors["big"][1234:1300])


def test_read_rows_of_pytorch_bin(tmp_path):
    t = torch.randn(20, 3)
    torch.save({"w": t}, str(tmp_path / "pytorch_model.bin"))
    reader = WeightReader(index_weights(str(tmp_path), "m"))
    assert torch.equal(reader.read_rows("w", 4, 11), t[4:11])
    assert torch.equal(reader.read("w"), t)
