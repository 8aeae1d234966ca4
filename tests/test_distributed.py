"""The Ray executor: assignment, row chunks, a simulated three-node cluster, worker and driver crashes,
memory budgets. Outputs are compared byte for byte with the in-process executor."""
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
from conftest import write_recipe

from ray_merge.engine import make_plan, run_merge
from ray_merge.errors import UserError
from ray_merge.execute.ray.actor import MergeWorker
from ray_merge.execute.ray.driver import RayExecutor
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.output.staging import JOURNAL, MANIFEST
from ray_merge.planner.shards import assign_shards, shard_cost, shard_need
from ray_merge.recipe.load import load_recipe

pytestmark = pytest.mark.timeout(400)

SHARD = 30_000  # bytes per output shard: ~20 shards for the small llama

LINEAR = """
merge_method: linear
models:
  - model: M/llama_ft0
    parameters: {weight: 0.5}
  - model: M/llama_ft1
    parameters: {weight: 0.3}
  - model: M/llama_ft2
    parameters: {weight: 0.2}
dtype: float32
out_dtype: bfloat16
"""

DARE_TIES = """
merge_method: dare_ties
base_model: M/llama_base
models:
  - model: M/llama_ft0
    parameters: {weight: 0.6, density: 0.5}
  - model: M/llama_ft1
    parameters: {weight: 0.4, density: 0.5}
dtype: float32
"""

TIES = DARE_TIES.replace("dare_ties", "ties")


class SlowWorker(MergeWorker):
    """A merge worker that sleeps before each shard: time to kill it (or its driver) while it is busy."""

    delay = 0.3

    def run_shard(self, index: int) -> dict:
        time.sleep(self.delay)
        return super().run_shard(index)


class KillingExecutor(RayExecutor):
    """Slow workers, and ``on_result(executor, result)`` called on the driver after each shard's result."""

    def __init__(self, spec: WorkerSpec, on_result):
        super().__init__(spec, worker_cls=SlowWorker)
        self.on_result = on_result

    def _record(self, slot, out: dict) -> None:
        super()._record(slot, out)
        self.on_result(self, out)


def recipe_file(tmp_path, models_dir, text, name="r.yml"):
    return write_recipe(tmp_path / name, text, **{"M/": f"{models_dir}/"})


def merge(recipe, out, executor=None, *, seed=None, budget=None, resume=False, shard=SHARD):
    options = MergeOptions(random_seed=seed, out_shard_bytes=shard, memory_budget=budget, resume=resume,
                           quiet=True)
    return run_merge(load_recipe(str(recipe)), str(out), options, executor=executor)


def read_files(d) -> dict[str, bytes]:
    out = {}
    for f in sorted(os.listdir(d)):
        if f != MANIFEST:
            with open(os.path.join(d, f), "rb") as fh:
                out[f] = fh.read()
    return out


def assert_same_output(a, b):
    fa, fb = read_files(a), read_files(b)
    assert sorted(fa) == sorted(fb)
    assert sum(f.endswith(".safetensors") for f in fa) > 1
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"
    ma, mb = (json.load(open(os.path.join(d, MANIFEST))) for d in (a, b))
    assert [s["checksum"] for s in ma["shards"]] == [s["checksum"] for s in mb["shards"]]


@pytest.fixture(scope="module")
def linear_ref(models_dir, tmp_path_factory):
    """The in-process merge every Ray run is compared with."""
    d = tmp_path_factory.mktemp("ref")
    r = recipe_file(d, models_dir, LINEAR)
    merge(r, d / "out")
    return r, d / "out"


# --------------------------------------------------------------------------------------------
# Without Ray: assignment, row chunks, budgets
# --------------------------------------------------------------------------------------------

def test_assignment_balances_largest_first_within_budgets(linear_ref):
    recipe, _ = linear_ref
    plan = make_plan(load_recipe(recipe), MergeOptions(out_shard_bytes=SHARD))
    loads = assign_shards(plan, plan.shards, [None, None, None])
    assigned = sorted(i for w in loads for i in w.shards)
    assert assigned == [s.index for s in plan.shards]
    costs = [w.cost for w in loads]
    biggest = max(shard_cost(plan, s) for s in plan.shards)
    assert max(costs) - min(costs) <= biggest
    assert loads == assign_shards(plan, plan.shards, [None, None, None])  # deterministic
    assert sum(w.bytes_written for w in loads) == plan.bytes_written

    # a worker whose budget is too small for a shard's largest tensor never gets that shard
    by_index = {s.index: s for s in plan.shards}
    small = sorted(shard_need(plan, s) for s in plan.shards)[len(plan.shards) // 2]
    loads = assign_shards(plan, plan.shards, [small, None])
    assert loads[0].shards and all(shard_need(plan, by_index[i]) <= small for i in loads[0].shards)
    assert any(shard_need(plan, s) > small for s in plan.shards)


def test_plan_shows_assignment(linear_ref, capsys):
    from ray_merge import cli

    recipe, _ = linear_ref
    assert cli.main(["plan", recipe, "--out-shard-size", str(SHARD), "--workers", "3",
                     "--worker-memory", "100KB"]) == 0
    out = capsys.readouterr().out
    for w in range(3):
        assert f"worker {w}: " in out
    assert "peak memory" in out and "reads" in out and "row chunks" in out and "no tensor data" in out


def test_row_chunks_give_identical_bytes(linear_ref, tmp_path):
    recipe, ref = linear_ref
    # 20 KB is far below the embedding's working set (~600 KB): it is merged a few rows at a time
    merge(recipe, tmp_path / "out", budget=20_000)
    assert_same_output(ref, tmp_path / "out")


def test_whole_tensor_method_over_budget_fails_before_any_work(models_dir, tmp_path):
    recipe = recipe_file(tmp_path, models_dir, TIES)
    for executor in (None, RayExecutor(WorkerSpec(workers=2, memory=100_000))):
        with pytest.raises(UserError) as e:
            merge(recipe, tmp_path / "out", executor, budget=100_000)
        assert "model.embed_tokens.weight" in str(e.value) and "needs" in str(e.value) and "KiB" in str(e.value)
        assert not os.path.exists(tmp_path / "out") and not os.path.exists(f"{tmp_path}/out.ray-merge-partial")


# --------------------------------------------------------------------------------------------
# A simulated three-node cluster (ray.cluster_utils.Cluster), shared by the tests below
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="rmt", dir="/tmp")  # short: Ray's socket paths are limited
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_TMPDIR"] = tmp
    if "ray" not in sys.modules:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback node addresses; read when ray is imported
    import ray
    from ray import cloudpickle
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # SlowWorker: Ray's workers cannot import us

    if ray.is_initialized():
        ray.shutdown()
    # 127.0.0.1 only where this process resolves its own address to loopback too (else ray.init cannot find it)
    ip = {} if ray_constants.ENABLE_RAY_CLUSTER else {"node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"rm_node0": 1},
                                                          include_dashboard=False, **ip))
    try:
        for i in (1, 2):
            c.add_node(num_cpus=1, resources={f"rm_node{i}": 1}, **ip)
        ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def node_ids():
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_three_nodes_same_bytes_as_in_process(cluster, linear_ref, tmp_path):
    recipe, ref = linear_ref
    ex = RayExecutor(WorkerSpec(workers=3))
    merge(recipe, tmp_path / "out", ex)
    assert_same_output(ref, tmp_path / "out")
    # every node did some of the work; each worker on its own node (SPREAD)
    assert set(ex.shard_nodes.values()) == node_ids() and len(node_ids()) == 3
    assert len({st["node_id"] for st in ex.stats}) == 3
    manifest = json.load(open(tmp_path / "out" / MANIFEST))
    assert [w["shards"] for w in manifest["workers"]] == [st["shards"] for st in ex.stats]
    assert sorted(i for w in manifest["workers"] for i in w["shards"]) == list(range(len(manifest["shards"])))
    # only checksums and stats came back: a few hundred bytes per shard, far less than the output
    assert manifest["executor"]["driver_bytes_received"] < 1000 * len(manifest["shards"])
    assert all(w["peak_rss_bytes"] > 0 and w["busy_s"] > 0 for w in manifest["workers"])
    assert not os.path.exists(tmp_path / "out" / ".ray-merge-attempts")

    one = RayExecutor(WorkerSpec(workers=1))
    merge(recipe, tmp_path / "out1", one)
    assert_same_output(ref, tmp_path / "out1")


def test_randomised_method_same_bytes_on_any_worker_count(cluster, models_dir, tmp_path):
    recipe = recipe_file(tmp_path, models_dir, DARE_TIES)
    merge(recipe, tmp_path / "ref", seed=7)
    merge(recipe, tmp_path / "other_seed", seed=8)
    assert read_files(tmp_path / "ref") != read_files(tmp_path / "other_seed")  # the seed matters
    merge(recipe, tmp_path / "ray3", RayExecutor(WorkerSpec(workers=3)), seed=7)
    assert_same_output(tmp_path / "ref", tmp_path / "ray3")
    merge(recipe, tmp_path / "ray2", RayExecutor(WorkerSpec(workers=2)), seed=7)
    assert_same_output(tmp_path / "ref", tmp_path / "ray2")


@pytest.mark.parametrize("restart", [False, True], ids=["worker-gone", "worker-restarted"])
def test_worker_killed_mid_merge(cluster, linear_ref, tmp_path, restart):
    import ray

    recipe, ref = linear_ref
    killed = {}

    def wait_for_restart(slot):
        deadline = time.monotonic() + 120
        while True:
            try:
                assert ray.get(slot.actor.ping.remote(), timeout=10)
                return
            except ray.exceptions.RayError:
                assert time.monotonic() < deadline, "Ray did not restart the worker"
                time.sleep(0.2)

    def kill_a_busy_worker(ex, result):
        if killed.get("landed"):
            return
        for ref, f in list(ex.pool._inflight.items()):
            slot, idx = ex.slots[f.actor], f.item
            finished, _ = ray.wait([ref], timeout=0)
            if slot.rank == result["worker"] or finished:
                continue
            killed.update(worker=slot.rank, shard=idx, landed=True)
            ray.kill(slot.actor, no_restart=not restart)  # while it works on shard idx
            if restart:
                # Hold the driver (so no shard is handed out) until Ray has the actor back: on a
                # loaded machine a restart can take longer than the other workers need to finish.
                wait_for_restart(slot)
                killed["left"] = len(ex.shard_nodes)
                # Workers start in step, so the kill may land just after that shard finished; then
                # the restarted actor simply goes on, and a later result tries again.
                ray.wait([ref], timeout=60)
                try:
                    ray.get(ref)
                    killed["landed"] = False
                except ray.exceptions.RayError:
                    pass
            # (A worker killed for good fails its next shard if it had finished this one.)
            return

    ex = KillingExecutor(WorkerSpec(workers=3), kill_a_busy_worker)
    merge(recipe, tmp_path / "out", ex)
    assert killed.get("landed"), "no kill landed while a worker was busy"
    assert_same_output(ref, tmp_path / "out")
    # one shard failed with its worker: the one it was doing (or, if that had just finished, the next)
    assert [r["worker"] for r in ex.retries] == [killed["worker"]]
    lost = ex.retries[0]["shard"]
    assert ex.stats[killed["worker"]]["failures"] == 1
    assert sorted(i for st in ex.stats for i in st["shards"]) == list(range(len(ex.shard_nodes)))
    if not restart:
        # redone by another worker, and the dead worker did nothing after it died
        assert ex.shard_workers[lost] != killed["worker"]
        assert lost not in ex.stats[killed["worker"]]["shards"]
    else:
        # Ray restarted the actor, which went on working
        assert killed["left"] < len(ex.shard_nodes) - 3  # work was left when it came back
        assert ex.stats[killed["worker"]]["shards"]


def test_worker_memory_stays_within_budget(cluster, tmp_path):
    """Peak RSS of a worker (kernel high-water mark, measured in the actor) over its baseline stays
    within its memory budget plus a constant, for a model whose embedding needs ~160 MiB to merge."""
    from models import make_family

    make_family(str(tmp_path / "m"), "llama", n_finetunes=2, seed=5, hidden=256, layers=1, intermediate=512,
                vocab=32768, heads=4, kv_heads=2)
    recipe = write_recipe(tmp_path / "big.yml", """
merge_method: linear
models:
  - {model: M/llama_ft0, parameters: {weight: 0.5}}
  - {model: M/llama_ft1, parameters: {weight: 0.5}}
dtype: float32
out_dtype: bfloat16
""", **{"M/": f"{tmp_path}/m/"})
    plan = make_plan(load_recipe(recipe), MergeOptions())
    budget = 16 * 2**20
    slack = 16 * 2**20  # the stated constant: allocator slack, thread stacks, Python objects
    assert max(pt.working_bytes for pt in plan.tensors) > 8 * budget

    merge(recipe, tmp_path / "ref", shard=20_000_000)
    ex = RayExecutor(WorkerSpec(workers=1, memory=budget))
    merge(recipe, tmp_path / "tight", ex, shard=20_000_000)
    assert_same_output(tmp_path / "ref", tmp_path / "tight")
    st = ex.stats[0]
    assert st["chunked_tensors"] >= 2  # embed_tokens and lm_head
    assert st["budget_bytes"] == budget
    assert st["peak_rss_over_baseline_bytes"] <= budget + slack, st

    # the same measurement sees the whole-tensor working set when the budget allows it
    loose = RayExecutor(WorkerSpec(workers=1, memory=2**30))
    merge(recipe, tmp_path / "loose", loose, shard=20_000_000)
    assert loose.stats[0]["chunked_tensors"] == 0
    assert loose.stats[0]["peak_rss_over_baseline_bytes"] > budget + slack


# --------------------------------------------------------------------------------------------
# The CLI on a local Ray instance: the driver is killed mid-merge, then --resume finishes it
# --------------------------------------------------------------------------------------------

def _ray_processes(marker: str):
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


def _stop(procs, timeout=10.0):
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


# The first driver: `ray-merge run RECIPE OUT --workers 2 --out-shard-size SHARD --quiet`, with workers that
# take half a second a shard (time to kill the driver mid-merge).
SLOW_DRIVER = """
import sys, time
from ray_merge.engine import run_merge
from ray_merge.execute.ray.actor import MergeWorker
from ray_merge.execute.ray.driver import RayExecutor
from ray_merge.options import MergeOptions, WorkerSpec
from ray_merge.recipe.load import load_recipe

class SlowWorker(MergeWorker):
    def run_shard(self, index):
        time.sleep(0.5)
        return super().run_shard(index)

recipe, out, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
run_merge(load_recipe(recipe), out, MergeOptions(out_shard_bytes=shard, quiet=True),
          executor=RayExecutor(WorkerSpec(workers=2), worker_cls=SlowWorker))
"""


@pytest.mark.slow
def test_driver_killed_then_resume_with_workers(linear_ref, tmp_path):
    recipe, ref = linear_ref
    raytmp = tempfile.mkdtemp(prefix="rmk", dir="/tmp")
    out = tmp_path / "out"
    stage = f"{out}.ray-merge-partial"
    journal = os.path.join(stage, JOURNAL)
    env = {**os.environ, "RAY_TMPDIR": raytmp}
    cmd = [sys.executable, "-m", "ray_merge.cli", "run", recipe, str(out), "--workers", "2",
           "--out-shard-size", str(SHARD), "--quiet"]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", SLOW_DRIVER, recipe, str(out), str(SHARD)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            if os.path.exists(journal) and open(journal).read().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert driver.poll() is None, open(tmp_path / "first.log").read()
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        records = [json.loads(line) for line in open(journal) if line.strip()]
        n_shards = len(make_plan(load_recipe(recipe), MergeOptions(out_shard_bytes=SHARD)).shards)
        assert 1 <= len(records) < n_shards
        finished = {}
        for r in records:
            st = os.stat(os.path.join(stage, r["filename"]))
            finished[r["filename"]] = (st.st_ino, st.st_mtime_ns)
        # the local Ray instance goes down with its driver
        deadline = time.time() + 30
        while _ray_processes(raytmp) and time.time() < deadline:
            time.sleep(0.5)

        res = subprocess.run(cmd + ["--resume", "-v"], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert_same_output(ref, out)
        for name, ident in finished.items():  # finished shards were kept, not rewritten
            st = os.stat(out / name)
            assert (st.st_ino, st.st_mtime_ns) == ident, name
        manifest = json.load(open(out / MANIFEST))
        redone = sorted(i for w in manifest["workers"] for i in w["shards"])
        assert len(redone) == n_shards - len(finished)
        assert not set(redone) & {r["index"] for r in records}
    finally:
        if driver.poll() is None:
            driver.kill()
        _stop(_ray_processes(raytmp))
        shutil.rmtree(raytmp, ignore_errors=True)
