"""Thread settings (ray_merge.parallel) and the torch-free start of `ray-merge methods`."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from ray_merge import parallel


def test_methods_command_does_not_import_torch():
    code = ("import sys, ray_merge.cli as cli\n"
            "rc = cli.main(['methods'])\n"
            "print('LOADED', sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout
    assert "linear  (no base model)" in out.stdout
    assert "density" in out.stdout  # the declared parameters are listed without the bodies' imports


def test_deferred_module_imports_on_first_use():
    import torch

    from ray_merge.methods import linear
    from ray_merge.methods.api import merge_tensors

    t = torch.ones(3, dtype=torch.bfloat16)
    out = merge_tensors("linear", [t, 3 * t], model_params=[{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out, 2 * t)
    assert linear.torch.Tensor is torch.Tensor  # attributes read through the stand-in are torch's own


def _cgroup(tmp_path, proc_line: str, files: dict) -> float | None:
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for rel, text in files.items():
        p = tmp_path / "fs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return parallel._cgroup_cpu_limit(str(tmp_path / "fs"), str(proc))


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    assert _cgroup(tmp_path, "0::/a/b", {"cpu.max": "max 100000", "a/cpu.max": "150000 100000",
                                          "a/b/cpu.max": "max 100000"}) == 1.5
    assert _cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"}) is None


def test_cgroup_v1_quota(tmp_path):
    files = {"cpu,cpuacct/x/cpu.cfs_quota_us": "50000", "cpu,cpuacct/x/cpu.cfs_period_us": "100000"}
    assert _cgroup(tmp_path, "4:cpu,cpuacct:/x", files) == 0.5
    files = {"cpu,cpuacct/x/cpu.cfs_quota_us": "-1", "cpu,cpuacct/x/cpu.cfs_period_us": "100000"}
    assert _cgroup(tmp_path, "4:cpu,cpuacct:/x", files) is None
    assert parallel._cgroup_cpu_limit(str(tmp_path), str(tmp_path / "missing")) is None


def test_thread_defaults_keep_the_users_values():
    env = {"OMP_NUM_THREADS": "3"}
    parallel.set_thread_defaults(env)
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    parallel.set_thread_defaults(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert int(env["OMP_NUM_THREADS"]) == parallel.available_cpus() >= 1


def test_element_wise_merges_leave_a_core_to_the_reader_and_writer_and_give_the_same_bytes(monkeypatch):
    """Block-wise (element-wise) merges run with one intra-op thread fewer, then the count is restored; the
    result is the same bytes as with every thread."""
    import dataclasses

    import torch

    from ray_merge.execute import compute
    from ray_merge.planner.plan import PlannedTensor, TensorInput

    before = torch.get_num_threads()
    seen = []
    real_merge = compute.get_method("linear", internal=True).merge
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(512, 2048, generator=g).to(torch.bfloat16) for _ in range(3)]
    pt = PlannedTensor(name="w", shape=(512, 2048), out_dtype="bfloat16",
                       inputs=[TensorInput(model=i, tensor="w", file="f", shape=(512, 2048), dtype="bfloat16")
                               for i in range(3)],
                       base_index=None, compute_dtype=None, params={"normalize": True},
                       model_params=[{"weight": w} for w in (0.5, 0.3, 0.2)], method="linear", working_bytes=0)
    method = dataclasses.replace(compute.get_method("linear", internal=True),
                                 fn=lambda inp: (seen.append(torch.get_num_threads()), real_merge(inp))[1])
    monkeypatch.setattr(compute, "get_method", lambda name, internal: method)
    out = compute.compute_tensor(pt, inputs, seed=0)
    assert seen and set(seen) == {max(1, before - 1)}
    assert torch.get_num_threads() == before
    with parallel.intra_op_threads(before):
        whole = real_merge(compute.MergeInputs(tensors=[t.float() for t in inputs], base_index=None,
                                               model_params=pt.model_params, params=pt.params, generator=None,
                                               name="w")).to(torch.bfloat16)
    assert torch.equal(out, whole)
