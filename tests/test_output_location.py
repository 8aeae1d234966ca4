"""Output locations that cannot hold the output: one line naming the path and the real reason, exit code 2."""
from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import save_file

from ray_merge.errors import UserError
from ray_merge.output import staging
from ray_merge.output.staging import check_output_location


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc")
    for name in ("a", "b"):
        d = root / name
        d.mkdir()
        save_file({"model.embed_tokens.weight": torch.zeros(4, 2), "model.layers.0.w.weight": torch.zeros(2, 2)},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 1}))
    return write_recipe(root / "r.yml", "merge_method: linear\nparameters: {weight: 1.0}\nmodels:\n"
                        "  - model: A\n  - model: B\n", A=root / "a", B=root / "b")


def _one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_run_into_proc_names_the_virtual_filesystem(recipe):
    """Not "not enough disk space at /proc": a virtual filesystem holds no files."""
    res = run_cli("run", recipe, "/proc/ray-merge-out")
    _one_line_error(res, "/proc/ray-merge-out", "/proc is on a virtual filesystem", "(proc)")
    assert "disk space" not in res.stderr


def test_output_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match=r"output .*out already exists and is a file, not a directory"):
        check_output_location(str(tmp_path / "out"))


def test_a_file_above_the_output(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"cannot create output .*f/sub/out: .*f is a file, not a directory"):
        check_output_location(str(tmp_path / "f" / "sub" / "out"))
    assert (tmp_path / "f").read_text() == "x"


def test_read_only_filesystem(tmp_path, monkeypatch):
    real = os.statvfs
    Stat = namedtuple("Stat", "f_flag f_blocks")
    monkeypatch.setattr(staging.os, "statvfs", lambda p: Stat(real(p).f_flag | os.ST_RDONLY, 1000))
    with pytest.raises(UserError, match=r"cannot create output .*new/out: .* is on a read-only filesystem"):
        check_output_location(str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()  # nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_directory_without_write_permission(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(UserError, match=r"output location .*locked is not writable: Permission denied"):
            check_output_location(str(d / "out"))
    finally:
        d.chmod(0o755)


def test_good_location_is_created_and_left_clean(tmp_path):
    out = check_output_location(str(tmp_path / "x" / "y" / "out"))
    assert out == str(tmp_path / "x" / "y" / "out")
    assert os.listdir(tmp_path / "x" / "y") == []  # the writability probe is removed


def test_urls_are_not_checked_as_local_paths():
    assert check_output_location("s3://bucket/prefix") == "s3://bucket/prefix"
    assert check_output_location("memory://x/out") == "memory://x/out"
