"""`ray-merge run --workers 2` on a local Ray instance when things go wrong (issue #14): each worker's process
killed once (Ray restarts them), killed for good (one line, a journal, --resume finishes), and the driver
stopped by a signal (Ray shut down, its temp dir removed)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import run_cli, write_recipe

from ray_merge.engine import run_merge
from ray_merge.options import MergeOptions
from ray_merge.output.staging import JOURNAL, MANIFEST
from ray_merge.recipe.load import load_recipe

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

SHARD = 30_000  # bytes per output shard: ~20 shards

LINEAR = """
merge_method: linear
models:
  - {model: M/llama_ft0, parameters: {weight: 0.5}}
  - {model: M/llama_ft1, parameters: {weight: 0.3}}
  - {model: M/llama_ft2, parameters: {weight: 0.2}}
dtype: float32
out_dtype: bfloat16
"""

# `ray-merge ARGS` with merge workers that sleep RM_DELAY seconds before each shard (time to kill them, or to
# stop the driver, mid-merge). With RM_NO_RESTART set, a worker Ray restarts fails in its constructor, so
# Ray cannot bring it back.
SLOW_CLI = """
import os, sys, time
import ray
import ray_merge.cli.run as run_command
from ray_merge import cli
from ray_merge.cli.options import spec_from_args
from ray_merge.execute.ray.actor import MergeWorker
from ray_merge.execute.ray.driver import RayExecutor

class SlowWorker(MergeWorker):
    delay = float(os.environ["RM_DELAY"])
    no_restart = bool(os.environ.get("RM_NO_RESTART"))

    def __init__(self, *args, **kwargs):
        if self.no_restart and ray.get_runtime_context().was_current_actor_reconstructed:
            raise RuntimeError("this worker cannot be restarted")
        super().__init__(*args, **kwargs)

    def run_shard(self, index):
        time.sleep(self.delay)
        return super().run_shard(index)

run_command.executor_from_args = lambda args: RayExecutor(spec_from_args(args), verbose=args.verbose,
                                                          worker_cls=SlowWorker)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A recipe over three small fine-tunes and its in-process output."""
    from models import make_family

    root = tmp_path_factory.mktemp("hard")
    make_family(str(root / "m"), "llama", n_finetunes=3, seed=1, hidden=64, layers=4, intermediate=128)
    recipe = write_recipe(root / "r.yml", LINEAR, **{"M/": f"{root}/m/"})
    run_merge(load_recipe(recipe), str(root / "ref"), MergeOptions(out_shard_bytes=SHARD, quiet=True))
    return recipe, root / "ref"


@pytest.fixture
def raytmp():
    d = tempfile.mkdtemp(prefix="rmh", dir="/tmp")  # short: Ray's socket paths are limited
    yield d
    _stop(_processes_mentioning(d))
    shutil.rmtree(d, ignore_errors=True)


def _processes_mentioning(marker: str):
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _stop(procs) -> None:
    import psutil

    for p in _alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _start_slow(recipe, out, raytmp, *args, delay=0.5, no_restart=False) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": raytmp, "RM_DELAY": str(delay),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    if no_restart:
        env["RM_NO_RESTART"] = "1"
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, "run", recipe, str(out), "--workers", "2",
                             "--out-shard-size", str(SHARD), "--quiet", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journaled(out) -> int:
    path = f"{out}.ray-merge-partial/{JOURNAL}"
    return open(path).read().count("\n") if os.path.exists(path) else 0


def _wait_for_shards(driver, out, n: int, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while _journaled(out) < n:
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the merge did not get going"
        time.sleep(0.05)


def _worker_pids(driver) -> list[int]:
    """The merge workers' processes (Ray titles them ray::SlowWorker...), descendants of the driver."""
    import psutil

    pids = []
    for p in psutil.Process(driver.pid).children(recursive=True):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::SlowWorker"):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def _kill_both_workers(driver, out) -> list[int]:
    _wait_for_shards(driver, out, 2)
    deadline = time.monotonic() + 30
    while len(pids := _worker_pids(driver)) < 2:
        assert time.monotonic() < deadline, pids
        time.sleep(0.1)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
    return pids


def _same_files(a, b) -> None:
    names = sorted(f for f in os.listdir(a) if f != MANIFEST)
    assert names == sorted(f for f in os.listdir(b) if f != MANIFEST)
    assert sum(f.endswith(".safetensors") for f in names) > 1
    for f in names:
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f


def test_each_worker_killed_once_comes_back(family, tmp_path, raytmp):
    recipe, ref = family
    out = tmp_path / "out"
    driver = _start_slow(recipe, out, raytmp, delay=1.0)
    try:
        killed = _kill_both_workers(driver, out)
        _, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, err
    _same_files(ref, out)
    manifest = json.load(open(out / MANIFEST))
    retried = sorted(r["worker"] for r in manifest["executor"]["retries"])
    assert set(retried) <= {0, 1} and len(retried) <= 2
    # Ray restarted both: each worker's last shard came from a new process
    assert all(w["pid"] not in killed for w in manifest["workers"]), (killed, manifest["workers"])


def test_workers_that_cannot_come_back_one_line_then_resume(family, tmp_path, raytmp):
    recipe, ref = family
    out = tmp_path / "out"
    driver = _start_slow(recipe, out, raytmp, no_restart=True)
    try:
        _kill_both_workers(driver, out)
        _, err = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 2, err
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("ray-merge")]
    assert len(ours) == 1 and ours[0].startswith("ray-merge: error: every merge worker died"), err
    assert "--resume" in ours[0] and raytmp in ours[0]  # Ray's logs of the run are kept, and named
    finished = _journaled(out)
    assert finished >= 2

    res = run_cli("run", recipe, out, "--workers", "2", "--out-shard-size", SHARD, "--resume", "--quiet",
                  env={"RAY_TMPDIR": raytmp})
    assert res.returncode == 0, res.stderr
    _same_files(ref, out)
    manifest = json.load(open(out / MANIFEST))
    assert len(manifest["shards"]) - finished == sum(len(w["shards"]) for w in manifest["workers"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_driver_stopped_by_a_signal_shuts_ray_down(family, tmp_path, raytmp, sig):
    recipe, _ = family
    out = tmp_path / "out"
    driver = _start_slow(recipe, out, raytmp)
    try:
        _wait_for_shards(driver, out, 1)
        import psutil

        ray_procs = psutil.Process(driver.pid).children(recursive=True)  # raylet, GCS, agents, workers
        assert len(ray_procs) >= 4 and _processes_mentioning(raytmp)
        driver.send_signal(sig)
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 128 + sig, err
    assert "Traceback" not in err and "rerun with --resume" in err, err
    deadline = time.monotonic() + 20
    while (_alive(ray_procs) or _processes_mentioning(raytmp)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(ray_procs), [p.cmdline() for p in _alive(ray_procs)]
    assert not _processes_mentioning(raytmp)
    assert os.listdir(raytmp) == []  # the run's Ray temp dir is gone
    assert _journaled(out) >= 1  # the journal stays for --resume
