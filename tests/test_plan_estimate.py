"""`ray-merge plan --workers N --throughput-from bench.json`: per worker, bytes read and written, peak memory and
an estimated wall time, from headers alone (header-only models from scripts/make_header_only_model.py: sparse
files, no tensor bytes; any read of tensor data fails the test)."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
from conftest import REPO, write_recipe

from ray_merge import cli
from ray_merge.cli.plan import read_throughput, worker_loads
from ray_merge.errors import UserError
from ray_merge.execute.loaders import TensorLoader
from ray_merge.io import models as io_models
from ray_merge.options import MergeOptions
from ray_merge.planner.plan import plan_recipe
from ray_merge.planner.shards import WorkerLoad, assign_shards, estimate_seconds
from ray_merge.recipe.load import load_recipe

_spec = importlib.util.spec_from_file_location("make_header_only_model",
                                               os.path.join(REPO, "scripts", "make_header_only_model.py"))
header_only = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(header_only)

SMALL = {"hidden": 128, "intermediate": 256, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": 2000}  # 2.2 MB
BUDGET = 10_000_000  # each worker's: above the largest tensor's working set (ties merges tensors whole)
TIES = """
merge_method: ties
base_model: M/base
models:
  - {model: M/ft0, parameters: {weight: 0.5, density: 0.5}}
  - {model: M/ft1, parameters: {weight: 0.3, density: 0.5}}
  - {model: M/ft2, parameters: {weight: 0.2, density: 0.5}}
dtype: bfloat16
"""
RATES = {"read_bytes_per_s": 2e6, "write_bytes_per_s": 5e5, "compute_s_per_byte": 2e-6}


@pytest.fixture
def no_reads(monkeypatch):
    """Any read of tensor data fails the test."""

    def fail(*a, **k):
        raise AssertionError("planning read tensor data")

    for target, attr in ((io_models.WeightReader, "read"), (io_models.WeightReader, "read_rows"),
                         (io_models, "_read_tensor"), (io_models, "_read_into_memory"),
                         (TensorLoader, "load"), (TensorLoader, "load_rows")):
        monkeypatch.setattr(target, attr, fail)


def model_set(root, shape: dict, shard_bytes: int) -> str:
    """A base and three fine-tunes, header only; returns the ties recipe over them."""
    for name in ("base", "ft0", "ft1", "ft2"):
        header_only.write_model(os.path.join(root, name), shape, "BF16", shard_bytes)
    return write_recipe(os.path.join(root, "ties.yml"), TIES, **{"M/": f"{root}/"})


@pytest.fixture
def small(tmp_path):
    recipe = model_set(str(tmp_path), SMALL, shard_bytes=600_000)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"schema": 1, "methods": {"ties": RATES, "linear": {**RATES, "wall_s": 1.0}}}))
    return recipe, str(bench)


def table(out: str) -> tuple[float, dict[int, list[str]]]:
    """The estimate table: its unit in bytes, and its per-worker rows (worker -> its columns)."""
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[re.search(r"read (\w+) ", out).group(1)]
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+) s)?", line)
        if m:
            rows[int(m.group(1))] = list(m.groups()[1:])
    return scale, rows


def plan_args(recipe: str, *extra: str) -> list[str]:
    return ["plan", recipe, "--out-shard-size", "300KB", "--workers", "3", "--worker-memory", str(BUDGET), *extra]


def test_header_only_models_are_sparse(tmp_path):
    total = header_only.write_model(str(tmp_path / "m"), SMALL, "BF16", 600_000)
    files = [f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    for f in files:
        st = os.stat(tmp_path / "m" / f)
        assert st.st_blocks * 512 < 64 * 1024 < st.st_size  # the data was never written
    index = io_models.index_weights(str(tmp_path / "m"), "m")
    assert sum(t.nbytes for t in index.values()) == total


def test_per_worker_estimate_follows_the_formula(small, no_reads, capsys):
    recipe, bench = small
    assert cli.main(plan_args(recipe, "--throughput-from", bench)) == 0
    out = capsys.readouterr().out
    scale, rows = table(out)
    assert sorted(rows) == [0, 1, 2] and all(r[-1] is not None for r in rows.values())

    plan = plan_recipe(load_recipe(recipe), out_shard_bytes=300_000)
    loads = assign_shards(plan, plan.shards, [BUDGET] * 3)
    # every shard is assigned once; the workers' bytes add up to the plan's
    assert sorted(i for w in loads for i in w.shards) == [s.index for s in plan.shards]
    assert sum(w.bytes_read for w in loads) == plan.bytes_read
    assert sum(w.bytes_written for w in loads) == plan.bytes_written
    assert sum(int(r[0]) for r in rows.values()) == len(plan.shards)
    for w in loads:
        seconds = (w.bytes_read / RATES["read_bytes_per_s"] + RATES["compute_s_per_byte"] * w.bytes_written
                   + w.bytes_written / RATES["write_bytes_per_s"])
        assert estimate_seconds(w, read_throughput(bench, "ties")) == pytest.approx(seconds)
        shards, read, written, peak, printed = rows[w.worker]
        assert int(shards) == len(w.shards)
        assert float(read) == pytest.approx(w.bytes_read / scale, abs=0.006)
        assert float(written) == pytest.approx(w.bytes_written / scale, abs=0.006)
        assert float(peak) == pytest.approx(w.peak_bytes / scale, abs=0.006)
        assert 0 < w.peak_bytes <= BUDGET
        assert float(printed) == pytest.approx(seconds, abs=0.051)
    slowest = max(estimate_seconds(w, read_throughput(bench, "ties")) for w in loads)
    assert f"estimated wall time: {slowest:.1f} s" in out


def test_the_cli_assignment_is_the_drivers(small, no_reads):
    recipe, _ = small
    args = cli.build_parser().parse_args(plan_args(recipe))
    plan = plan_recipe(load_recipe(recipe), out_shard_bytes=300_000)
    options = MergeOptions(out_shard_bytes=300_000)
    assert worker_loads(plan, args, options) == assign_shards(plan, plan.shards, [BUDGET] * 3)


def test_without_throughputs_no_time_column(small, no_reads, capsys):
    recipe, _ = small
    assert cli.main(plan_args(recipe)) == 0
    out = capsys.readouterr().out
    _, rows = table(out)
    assert sorted(rows) == [0, 1, 2] and all(r[-1] is None for r in rows.values())
    assert "est. time" not in out and "estimated wall time" not in out


def test_in_process_estimate_is_one_worker(small, no_reads, capsys):
    recipe, bench = small
    assert cli.main(["plan", recipe, "--memory-budget", str(BUDGET), "--throughput-from", bench]) == 0
    _, rows = table(capsys.readouterr().out)
    plan = plan_recipe(load_recipe(recipe))
    seconds = (plan.bytes_read / RATES["read_bytes_per_s"] + RATES["compute_s_per_byte"] * plan.bytes_written
               + plan.bytes_written / RATES["write_bytes_per_s"])
    assert list(rows) == [0] and float(rows[0][-1]) == pytest.approx(seconds, abs=0.051)


def test_bad_bench_files_are_one_line(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"methods": {"ties": RATES}}))
    with pytest.raises(UserError, match="no measurements for slerp.*it has: ties"):
        read_throughput(str(path), "slerp")
    path.write_text(json.dumps({"methods": {"ties": {**RATES, "write_bytes_per_s": 0}}}))
    with pytest.raises(UserError, match="methods.ties.write_bytes_per_s: needs a positive number"):
        read_throughput(str(path), "ties")
    path.write_text("{")
    with pytest.raises(UserError, match="not JSON"):
        read_throughput(str(path), "ties")


def test_example_bench_file_reproduces_its_wall_times():
    """scripts/bench_example.json (derived from README's Performance table): one worker doing the whole 1.1B
    merge takes the measured wall time back."""
    path = os.path.join(REPO, "scripts", "bench_example.json")
    with open(path) as f:
        data = json.load(f)
    for method in ("ties", "dare_ties", "task_arithmetic"):
        entry = data["methods"][method]
        rate = read_throughput(path, method)
        load = WorkerLoad(0, None, bytes_read=entry["bytes_read"], bytes_written=entry["bytes_written"])
        assert estimate_seconds(load, rate) == pytest.approx(entry["wall_s"])


def test_70b_ties_plan_from_headers(tmp_path, no_reads, capsys):
    """Llama-3-70B-shaped base + 3 fine-tunes (4 x 141 GB of sparse files): planned in seconds, nothing read."""
    recipe = model_set(str(tmp_path), header_only.LLAMA3_70B, header_only.HUB_SHARD_BYTES)
    bench = os.path.join(REPO, "scripts", "bench_example.json")
    assert cli.main(["plan", recipe, "--workers", "4", "--worker-memory", "32GiB", "--throughput-from", bench]) == 0
    out = capsys.readouterr().out
    scale, rows = table(out)
    assert scale == 1e9 and sorted(rows) == [0, 1, 2, 3] and sum(int(r[0]) for r in rows.values()) == 30
    assert "bytes read:    564.430 GB" in out and "bytes written: 141.107 GB" in out
    assert sum(float(r[1]) for r in rows.values()) == pytest.approx(564.43, abs=0.05)
    assert all(float(r[3]) <= 32 * 2**30 / 1e9 for r in rows.values())
    assert "estimated wall time:" in out
