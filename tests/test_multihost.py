"""A merge across hosts with no shared directory (issue #12): a Ray head and two worker nodes, each in its own
network namespace with its own address and its own disk for Ray's temp dir and TMPDIR, joined by a bridge
(tests/netns.py), and an S3 server (moto) on the test's own address on that network. The inputs are on a path
every host has; the output goes to the S3 server, each shard uploaded by the worker that merged it. The driver runs
`ray-merge run RECIPE s3://... --address HEAD:6379` on the head. The merge's bytes equal the in-process merge's,
also when a worker node dies mid-merge (every process on it killed) or is cut off the network mid-merge.

Needs root for `ip netns` (skipped, with the reason, where the machine does not allow it).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import write_recipe
from netns import Network, unavailable

from ray_merge.engine import run_merge
from ray_merge.options import MergeOptions
from ray_merge.output.staging import MANIFEST
from ray_merge.recipe.load import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SHARD = 30_000  # bytes per output shard: ~20 shards
PORT = 6379
BUCKET = f"multihost-{os.getpid()}"  # moto's buckets live in this process, with other tests' own
HOSTS = ["head", "w1", "w2"]

LINEAR = """
merge_method: linear
models:
  - {model: M/llama_ft0, parameters: {weight: 0.5}}
  - {model: M/llama_ft1, parameters: {weight: 0.3}}
  - {model: M/llama_ft2, parameters: {weight: 0.2}}
dtype: float32
out_dtype: bfloat16
"""

# The GCS declares a node dead after 4 failed health checks a second apart, each given 2 s (Ray's default:
# 5, 3 s apart, 10 s each), so a node that dies (or drops off the network) is noticed within 5 (15) seconds.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 2000, "health_check_failure_threshold": 4}

# `ray-merge ARGS` with merge workers that sleep RM_DELAY seconds before each shard: time to kill a node
# while shards remain.
SLOW_CLI = """
import os, sys, time
import ray_merge.cli.run as run_command
from ray_merge import cli
from ray_merge.cli.options import spec_from_args
from ray_merge.execute.ray.actor import MergeWorker
from ray_merge.execute.ray.driver import RayExecutor

class SlowWorker(MergeWorker):
    delay = float(os.environ["RM_DELAY"])

    def run_shard(self, index):
        time.sleep(self.delay)
        return super().run_shard(index)

run_command.executor_from_args = lambda args: RayExecutor(spec_from_args(args), verbose=args.verbose,
                                                          worker_cls=SlowWorker)
sys.exit(cli.main(sys.argv[1:]))
"""


class RayHosts:
    """Ray on the hosts of a :class:`Network`: the head (no CPUs: it runs the driver, no merge worker) and
    worker nodes with one CPU each (one merge worker each), every node's temp dir on its own disk."""

    def __init__(self, net: Network, s3_env: dict):
        self.net = net
        self.head = HOSTS[0]
        self.address = f"{net.ip(self.head)}:{PORT}"
        # Token authentication, the token handed to every node and the driver (no shared ~/.ray/auth_token);
        # every host has the S3 server's address and credentials
        self.env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                    "TMPDIR": os.path.join(net.local_dir, "tmp")}
        for k in ("RAY_ADDRESS", "RAY_TMPDIR"):
            self.env.pop(k, None)
        self._head: subprocess.Popen | None = None

    def _ray_start(self, host: str, *args: str) -> subprocess.Popen:
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--node-ip-address",
               self.net.ip(host), "--temp-dir", os.path.join(self.net.local_dir, "ray"), "--disable-usage-stats",
               "--object-store-memory", str(80 * 2**20), *args]
        return self.net.popen(host, cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start(self) -> None:
        """Start the head (in the background: :meth:`ensure_workers` waits for it)."""
        self._head = self._ray_start(self.head, "--head", "--port", str(PORT), "--num-cpus", "0",
                                     "--include-dashboard", "false", "--system-config", json.dumps(SYSTEM_CONFIG))

    def start_workers(self, hosts: list[str]) -> None:
        procs = [self._ray_start(h, "--address", self.address, "--num-cpus", "1") for h in hosts]
        for p in procs:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out

    def ensure_workers(self) -> None:
        """The head and every worker node up (one that a test killed or cut off starts afresh)."""
        if self._head is not None:
            out, _ = self._head.communicate(timeout=180)
            assert self._head.returncode == 0, out
            self._head = None
        gone = [h for h in HOSTS[1:] if not _processes_on(self, h, "raylet")]
        for h in gone:
            if not self.net.pids(h):  # killed (else only its disk is up)
                self.net.boot(h)
        if gone:
            self.start_workers(gone)

    def popen_driver(self, args: list, *, delay: float = 0.0) -> subprocess.Popen:
        """`ray-merge ARGS --address HEAD` run on the head (slow workers with a delay)."""
        env = {**self.env, "RM_DELAY": str(delay)}
        prog = ["-c", SLOW_CLI] if delay else ["-m", "ray_merge.cli"]
        return self.net.popen(self.head, [sys.executable, *prog, *map(str, args), "--address", self.address],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class S3:
    """The S3 server (moto, in this process) on ``address``, with its bucket; the test reads it with boto3."""

    def __init__(self, address: str):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.server = ThreadedMotoServer(ip_address=address, port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ACCESS_KEY_ID": "multihost", "AWS_SECRET_ACCESS_KEY": "multihost",
                    "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
        import boto3

        self.client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                   aws_access_key_id="multihost", aws_secret_access_key="multihost")
        self.client.create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        self.server.stop()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def files(self, prefix: str) -> dict[str, bytes]:
        """The objects under ``prefix/``, by name below it."""
        return {k[len(prefix) + 1:]: self.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()
                for k in self.keys(prefix + "/")}

    def journaled(self, prefix: str) -> int:
        """Shards the run writing ``prefix`` has journaled (one object each)."""
        return len(self.keys(f"{prefix}.ray-merge-partial/journal/"))


@pytest.fixture(scope="module")
def hosts():
    """(RayHosts, S3): Ray on three hosts and the S3 server they write to."""
    why = unavailable()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    root = tempfile.mkdtemp(prefix="rmh", dir="/tmp")  # short: Ray's socket paths are limited
    s3 = None
    try:
        with Network(HOSTS, local_dir=os.path.join(root, "local")) as net:
            s3 = S3(net.host_ip)
            ray_hosts = RayHosts(net, s3.env)
            ray_hosts.start()  # while the models are built
            yield ray_hosts, s3
    finally:
        if s3 is not None:
            s3.stop()
        for _ in range(50):  # a host's disk may stay mounted (busy) a moment after its last process died
            shutil.rmtree(root, ignore_errors=True)
            if not os.path.exists(root):
                break
            time.sleep(0.1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A recipe over three small fine-tunes (on a path every host has) and its in-process output."""
    from models import make_family

    root = tmp_path_factory.mktemp("multihost")
    make_family(str(root / "m"), "llama", n_finetunes=3, seed=1, hidden=64, layers=4, intermediate=128)
    recipe = write_recipe(root / "r.yml", LINEAR, **{"M/": f"{root}/m/"})
    run_merge(load_recipe(recipe), str(root / "ref"), MergeOptions(out_shard_bytes=SHARD, quiet=True))
    return recipe, root / "ref"


def _same_output(ref, s3: S3, prefix: str) -> dict:
    """The output under ``prefix`` has the files of the local output ``ref``, byte for byte (the manifest
    aside), and no bookkeeping is left; returns its manifest."""
    got = s3.files(prefix)
    names = sorted(f for f in os.listdir(ref) if f != MANIFEST)
    assert sorted(got) == sorted([*names, MANIFEST])
    assert sum(f.endswith(".safetensors") for f in names) > 1
    for f in names:
        with open(os.path.join(ref, f), "rb") as fh:
            assert got[f] == fh.read(), f
    assert not s3.keys(f"{prefix}.ray-merge-partial/")
    return json.loads(got[MANIFEST])


def _processes_on(hosts: RayHosts, host: str, name: str) -> list[int]:
    """The processes on ``host`` whose command starts with ``name`` (a path's last part, or a title Ray set)."""
    import psutil

    found = []
    for pid in hosts.net.pids(host):
        try:
            cmd = (psutil.Process(pid).cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if os.path.basename(cmd).startswith(name):
            found.append(pid)
    return found


def _wait_mid_merge(hosts: RayHosts, s3: S3, driver, prefix: str, host: str, n: int = 2,
                    timeout: float = 180.0) -> None:
    """Until ``n`` shards are done and a merge worker runs on ``host``."""
    deadline = time.monotonic() + timeout
    while s3.journaled(prefix) < n or not _processes_on(hosts, host, "ray::SlowWorker"):
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "the merge did not get going"
        time.sleep(0.05)


def _finish(driver, timeout: float = 240.0) -> str:
    try:
        _, err = driver.communicate(timeout=timeout)
    finally:
        driver.kill()
    assert driver.returncode == 0, err
    return err


def _workers_by_host(hosts: RayHosts, manifest: dict) -> dict[str, dict]:
    ips = {hosts.net.ip(h): h for h in HOSTS}
    return {ips[w["node_ip"]]: w for w in manifest["workers"]}


def _run_args(recipe, prefix: str) -> list:
    return ["run", recipe, f"s3://{BUCKET}/{prefix}", "--workers", "2", "--out-shard-size", SHARD, "--quiet"]


def test_merge_across_hosts(hosts, family):
    ray_hosts, s3 = hosts
    recipe, ref = family
    ray_hosts.ensure_workers()
    _finish(ray_hosts.popen_driver(_run_args(recipe, "plain")))
    manifest = _same_output(ref, s3, "plain")
    by_host = _workers_by_host(ray_hosts, manifest)
    assert sorted(by_host) == ["w1", "w2"]  # one worker on each worker node, none on the head
    assert all(w["shards"] for w in by_host.values())
    assert manifest["executor"]["address"] == ray_hosts.address and not manifest["executor"]["retries"]


@pytest.mark.parametrize("failure", ["killed", "cut-off"])
def test_worker_node_lost_mid_merge(hosts, family, failure):
    ray_hosts, s3 = hosts
    net = ray_hosts.net
    recipe, ref = family
    ray_hosts.ensure_workers()
    driver = ray_hosts.popen_driver(_run_args(recipe, failure), delay=0.3)
    try:
        _wait_mid_merge(ray_hosts, s3, driver, failure, "w1")
        if failure == "killed":
            raylet = _processes_on(ray_hosts, "w1", "raylet")
            assert raylet and set(raylet) <= set(net.kill("w1"))
        else:
            net.cut("w1")
        done_before = s3.journaled(failure)
        _finish(driver)
    finally:
        if failure == "cut-off":
            net.kill("w1")  # a node cut off stays off: the next test starts a new one
            net.mend("w1")
    manifest = _same_output(ref, s3, failure)
    n_shards = len(manifest["shards"])
    assert done_before < n_shards - 2  # shards remained when the node went
    by_host = _workers_by_host(ray_hosts, manifest)
    lost, kept = by_host["w1"], by_host["w2"]
    # the shard w1 held was redone by w2, with w1's queue
    retries = manifest["executor"]["retries"]
    assert retries and {r["worker"] for r in retries} == {lost["worker"]}
    assert sorted(lost["shards"] + kept["shards"]) == list(range(n_shards))
    assert {r["shard"] for r in retries} <= set(kept["shards"])
    assert len(kept["shards"]) > n_shards // 2
