"""Which weight files a hub model's download asks for: one format, only the files the index names."""
from __future__ import annotations

import json

import huggingface_hub
import pytest

from ray_merge.io.models import WEIGHT_PATTERNS, hub_weight_files


def _fake_hub(monkeypatch, tmp_path, files, index=None):
    class Api:
        def list_repo_files(self, repo, revision=None):
            return list(files)

    def download(repo, filename, revision=None):
        path = tmp_path / filename
        path.write_text(json.dumps({"weight_map": index or {}}))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def _ref():
    from ray_merge.io.models import ModelRef

    return ModelRef.parse("org/model@main")


def test_sharded_safetensors_beside_bin_and_consolidated(monkeypatch, tmp_path):
    files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin.index.json",
             "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    _fake_hub(monkeypatch, tmp_path, files, {"a": "model-00001-of-00002.safetensors",
                                             "b": "model-00002-of-00002.safetensors"})
    assert hub_weight_files(_ref()) == ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors"]


@pytest.mark.parametrize("files, want", [
    (["model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
    (["pytorch_model.bin"], ["pytorch_model.bin"]),
    (["weights.safetensors", "pytorch_model-1.bin"], ["*.safetensors"]),
])
def test_one_format(monkeypatch, tmp_path, files, want):
    _fake_hub(monkeypatch, tmp_path, files)
    assert hub_weight_files(_ref()) == want


def test_offline_falls_back_to_the_cache(monkeypatch):
    class Api:
        def list_repo_files(self, repo, revision=None):
            raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert hub_weight_files(_ref()) == WEIGHT_PATTERNS
