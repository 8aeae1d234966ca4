"""Benchmark `ray-merge run` against `mergekit-yaml` on a ~1B-parameter Llama-shaped model.

Builds (or reuses, under --cache) a base and three fine-tunes (bf16, sharded safetensors),
then for each method runs mergekit and ray-merge in this same run and prints wall
time, peak RSS (process tree, sampled) and the ratios. Writes the measured throughputs to
bench.json (--json), for `ray-merge plan --throughput-from bench.json`.

    python scripts/bench_merge.py                       # all methods, both tools
    python scripts/bench_merge.py --methods linear,ties --memory-budget 2GiB
    python scripts/bench_merge.py --workers 1,2         # ray-merge on Ray with N workers too
    python scripts/bench_merge.py --shape tiny --no-mergekit --methods ties   # seconds: checks the script
    python scripts/bench_merge.py --methods linear --contended 8 --repeat 2   # beside 8 busy processes
    python scripts/bench_merge.py --large --methods linear,ties --memory-budget 4GiB   # inputs > 1.5x RAM

--contended N starts N busy processes (pure-Python loops) before the runs and stops them after, so both tools
share the cores with them; each run's CPU time (its process tree's, from the kernel's accounting of reaped
children) and the 1-minute load average are printed beside its wall time. --repeat K runs the tools K times,
alternating which goes first.

--large builds (once, under CACHE/large) a Llama-shaped bf16 base and three fine-tunes whose files together are
1.5x this machine's RAM, written in row chunks (no model is ever held in memory), and measures each tool
from a cold page cache (caches dropped before every run when running as root) against each recipe's floor:
reading every input file of that recipe once (cold) and writing (fdatasync'd) a file of the output's size.

bench.json (schema 1; sizes in bytes, times in seconds, GB = 1e9 bytes):

    {"schema": 1,
     "note": "...",                                      # where the numbers come from (free text)
     "machine": {"cpus": 2, "platform": "Linux-..."},
     "shape": {"hidden": 2048, ...}, "dtype": "bfloat16", "model_bytes": 2200096768,
     "io": {"read_bytes": ..., "read_s": ..., "write_bytes": ..., "write_s": ..., "startup_s": ...},
     "methods": {
       "ties": {"bytes_read": 8800387072,               # the plan's bytes read (inputs) ...
                "bytes_written": 2200096768,            # ... and written (output tensors)
                "wall_s": 45.5,                         # `ray-merge run`, in process, start-up included
                "read_bytes_per_s": ...,                # io.read_bytes / io.read_s
                "write_bytes_per_s": ...,               # io.write_bytes / io.write_s
                "compute_s_per_byte": ...,              # the rest of the wall time, per output byte
                "runs": {"mergekit": 278.5, "ray-merge": 45.5}}}}   # wall time of every tool run

How the rates are measured: read throughput by reading every input file of the four models from the page
cache as the merges find it (warmed first, as here); write throughput by writing as many bytes as the largest
output to a file beside the runs and fsync'ing it (durable, what a large output written on a cluster node
sees); start-up as the wall time of `ray-merge plan` on the first recipe (interpreter, imports, planning).
The compute time per output byte is what is left of ray-merge's wall time:
max(0, wall_s - startup_s - bytes_read / read_bytes_per_s - bytes_written / write_bytes_per_s) / bytes_written,
so `startup_s + bytes_read / read + compute x bytes_written + bytes_written / write` gives back wall_s (unless
clipped at 0); `ray-merge plan --throughput-from` leaves the start-up out (a fixed cost, not per byte).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from make_header_only_model import llama_tensors  # noqa: E402  (scripts/ is this script's directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TinyLlama-like: 22 layers, hidden 2048, MLP 5632, vocab 32000 -> 1.10B parameters
SHAPE = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
# --shape tiny: a few hundred kB per model, to check the script (its numbers mean little)
SHAPES = {"1b": SHAPE,
          "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 256}}

RECIPES = {
    "linear": """
merge_method: linear
models:
  - {{model: {c}/ft0, parameters: {{weight: 0.5}}}}
  - {{model: {c}/ft1, parameters: {{weight: 0.3}}}}
  - {{model: {c}/ft2, parameters: {{weight: 0.2}}}}
dtype: bfloat16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {c}/base
models:
  - {{model: {c}/ft0, parameters: {{weight: 0.5}}}}
  - {{model: {c}/ft1, parameters: {{weight: 0.3}}}}
  - {{model: {c}/ft2, parameters: {{weight: 0.2}}}}
dtype: bfloat16
""",
    "slerp": """
merge_method: slerp
base_model: {c}/ft0
models:
  - {{model: {c}/ft0}}
  - {{model: {c}/ft1}}
parameters: {{t: 0.4}}
dtype: bfloat16
""",
    "ties": """
merge_method: ties
base_model: {c}/base
models:
  - {{model: {c}/ft0, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {c}/ft1, parameters: {{weight: 0.3, density: 0.5}}}}
  - {{model: {c}/ft2, parameters: {{weight: 0.2, density: 0.5}}}}
dtype: bfloat16
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {c}/base
models:
  - {{model: {c}/ft0, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {c}/ft1, parameters: {{weight: 0.3, density: 0.5}}}}
  - {{model: {c}/ft2, parameters: {{weight: 0.2, density: 0.5}}}}
dtype: bfloat16
""",
}


def build_models(cache: str, s: dict = SHAPE) -> None:
    """Base: random bf16 weights; fine-tunes: base + small seeded noise. Written as ~1 GB shards."""
    from safetensors.torch import save_file

    from ray_merge.demo import save_tokenizer

    names = ["base", "ft0", "ft1", "ft2"]
    if all(os.path.exists(os.path.join(cache, n, "config.json")) for n in names):
        return
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
    }
    spec = llama_tensors(s)
    total = sum(torch.Size(sh).numel() for _, sh in spec)
    print(f"building 4 models of {total / 1e9:.2f}B parameters in {cache} ...", file=sys.stderr)
    for k, name in enumerate(names):
        d = os.path.join(cache, name)
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        g = torch.Generator().manual_seed(1000)  # same base draw for every model
        gn = torch.Generator().manual_seed(2000 + k)
        shard, shard_bytes, files, weight_map = {}, 0, [], {}

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                fn = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, os.path.join(tmp, fn), metadata={"format": "pt"})
                files.append(fn)
                for t in shard:
                    weight_map[t] = fn
                shard, shard_bytes = {}, 0

        for tname, shape in spec:
            if len(shape) == 1:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g) * 0.02
            if k > 0:
                t += torch.randn(shape, generator=gn) * 0.002
            shard[tname] = t.to(torch.bfloat16)
            shard_bytes += t.numel() * 2
            if shard_bytes > 1_000_000_000:
                flush()
        flush()
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_tokenizer(tmp)
        os.replace(tmp, d)
        print(f"  {name} done", file=sys.stderr)


def warm_page_cache(cache: str) -> None:
    for root, _, files in os.walk(cache):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                while fh.read(1 << 26):
                    pass


def read_throughput(cache: str) -> tuple[int, float]:
    """(bytes, seconds) to read every safetensors file under ``cache`` (from the page cache, once warmed)."""
    buf = bytearray(1 << 26)
    total, start = 0, time.perf_counter()
    for root, _, files in os.walk(cache):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                with open(os.path.join(root, f), "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        total += n
    return total, time.perf_counter() - start


def write_throughput(directory: str, nbytes: int) -> tuple[int, float]:
    """(bytes, seconds) to write ``nbytes`` to a new file in ``directory`` and fsync it."""
    block = os.urandom(1 << 26)
    path = os.path.join(directory, "write-throughput.tmp")
    os.sync()
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[:min(left, len(block))])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return nbytes, seconds


def planned_bytes(recipe: str) -> tuple[int, int]:
    """(bytes read, bytes written) of a recipe, from `ray-merge plan`'s planner (headers only)."""
    from ray_merge.planner.plan import plan_recipe
    from ray_merge.recipe.load import load_recipe

    plan = plan_recipe(load_recipe(recipe))
    return plan.bytes_read, plan.bytes_written


def bench_json(rows: list, planned: dict, io: dict, shape: dict, note: str) -> dict:
    """bench.json (schema in this file's docstring) from the runs: rates of each method's in-process ray-merge."""
    read_rate = io["read_bytes"] / io["read_s"]
    write_rate = io["write_bytes"] / io["write_s"]
    methods = {}
    for method, results in rows:
        read, written = planned[method]
        ok = [r.wall for r in results["ray-merge"] if r.rc == 0]
        if not ok:
            continue
        wall = median(ok)
        rest = max(0.0, wall - io["startup_s"] - read / read_rate - written / write_rate)
        methods[method] = {
            "bytes_read": read, "bytes_written": written, "wall_s": round(wall, 3),
            "read_bytes_per_s": read_rate, "write_bytes_per_s": write_rate, "compute_s_per_byte": rest / written,
            "runs": {label: round(median([r.wall for r in runs if r.rc == 0]), 3)
                     for label, runs in results.items() if any(r.rc == 0 for r in runs)},
        }
    model_bytes = sum(torch.Size(sh).numel() for _, sh in llama_tensors(shape)) * 2
    return {"schema": 1, "note": note, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "shape": shape, "dtype": "bfloat16", "model_bytes": model_bytes, "io": io, "methods": methods}


@dataclass
class Run:
    wall: float  # seconds
    rss: float  # peak RSS of the process tree, GB
    rc: int
    cpu: float = 0.0  # user + system CPU seconds of the process tree
    load: float = 0.0  # 1-minute load average when the run ended


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(cmd: list[str], env: dict) -> Run:
    """Run a command; return its wall time, peak RSS of its process tree, exit code and CPU time."""
    os.sync()  # the previous run's output is on disk: its write-back does not load this run
    cpu0 = _children_cpu()
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                rss = sum(x.memory_info().rss for x in procs if x.is_running())
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    wall = time.time() - start
    if proc.returncode != 0:
        print(f"  FAILED ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}", file=sys.stderr)
    # the tree's processes were reaped (the busy processes of --contended are reaped only after every run)
    return Run(wall, peak / 1e9, proc.returncode, _children_cpu() - cpu0, os.getloadavg()[0])


BUSY_LOOP = "while True:\n    pass\n"


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that only spin (pure Python), so the merges share the cores with them."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    if procs:
        time.sleep(2.0)  # let them reach the run queue
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def drop_caches() -> bool:
    """Empty the page cache (as root); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_free(path: str) -> int:
    return shutil.disk_usage(path).free


def merge_cmd(recipe: str, out: str, args, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "ray_merge.cli", "run", recipe, out, "--random-seed", "0", "--quiet", *extra]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    return cmd


def run_tools(method: str, recipe: str, work: str, args, env: dict) -> dict[str, list[Run]]:
    """Every tool's runs of one recipe, ``args.repeat`` times, alternating which tool goes first."""
    tools = []
    if not args.no_mergekit:
        tools.append(("mergekit", lambda out: [args.mergekit, recipe, out, "--random-seed", "0"]))
    tools.append(("ray-merge", lambda out: merge_cmd(recipe, out, args)))
    for n in (n for n in args.workers.split(",") if n):
        tools.append((f"ray-merge --workers {n}", lambda out, n=n: merge_cmd(recipe, out, args, ["--workers", n])))
    results: dict[str, list[Run]] = {label: [] for label, _ in tools}
    for rep in range(args.repeat):
        for label, make in (tools if rep % 2 == 0 else tools[::-1]):
            out = os.path.join(work, f"out_{method}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + ".ray-merge-partial", ignore_errors=True)  # left by an interrupted run
            if args.large:
                drop_caches()
            run = measure(make(out), env)
            shutil.rmtree(out, ignore_errors=True)
            results[label].append(run)
            print(f"{method:16s} {label:24s} {run.wall:7.1f} s  cpu {run.cpu:7.1f} s ({run.cpu / run.wall:4.2f} of a "
                  f"core)  {run.rss:5.2f} GB peak RSS  load {run.load:5.1f}  rc={run.rc}", flush=True)
    return results


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def print_table(rows: list, args) -> None:
    print()
    what = f" beside {args.contended} busy processes" if args.contended else ""
    print(f"{os.cpu_count()} CPUs{what}; medians of {args.repeat} run(s) per tool; load = 1-min load average")
    print("| method | tool | wall (s) | CPU (s) | CPU/wall | peak RSS (GB) | load | speed-up vs mergekit (same run) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, results in rows:
        mk = [r for r in results.get("mergekit", []) if r.rc == 0]
        for label, runs in results.items():
            ok = [r for r in runs if r.rc == 0]
            if not ok:
                print(f"| {method} | {label} | failed | | | | | |")
                continue
            wall, cpu = median([r.wall for r in ok]), median([r.cpu for r in ok])
            rss, load = max(r.rss for r in ok), median([r.load for r in ok])
            speed = ""
            if mk and label != "mergekit":
                ratios = [m.wall / r.wall for m, r in zip(mk, ok)]
                speed = f"{median([m.wall for m in mk]) / wall:.2f}x (each: {', '.join(f'{x:.2f}' for x in ratios)})"
            print(f"| {method} | {label} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} | {rss:.2f} | {load:.1f} | "
                  f"{speed} |")


# ---------------------------------------------------------------------------------------------
# --large: inputs bigger than the machine's memory
# ---------------------------------------------------------------------------------------------

LARGE_BASE = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 8, "vocab": 32000}
LARGE_SHARD_BYTES = 4_000_000_000
_CHUNK_ELEMENTS = 1 << 24  # written per row chunk


def large_shape(total_bytes: int) -> dict:
    """A Llama shape (hidden 4096) with enough layers that 4 bf16 models hold ``total_bytes``."""
    s = dict(LARGE_BASE, layers=1)
    one = sum(math.prod(sh) for _, sh in llama_tensors(s)) * 2
    s0 = dict(LARGE_BASE, layers=0)
    fixed = sum(math.prod(sh) for _, sh in llama_tensors(s0)) * 2
    s["layers"] = max(1, math.ceil((total_bytes / 4 - fixed) / (one - fixed)))
    return s


_POOL_ELEMENTS = (1 << 27) + 4099  # 256 MiB of bf16 values, an odd size so that chunks start at varying offsets


def _bf16_pool(model: int) -> torch.Tensor:
    """Random bf16 values of magnitude ~0.01 (random sign and mantissa, exponent 2^-7) drawn once per model;
    the fine-tunes (model > 0) differ from the base in the low mantissa bits. Drawing every byte of 36 GB
    would take longer than writing it: chunks are slices of this pool at varying offsets."""
    import numpy as np

    bits = np.random.Generator(np.random.SFC64(1000)).integers(0, 1 << 16, _POOL_ELEMENTS, dtype=np.uint16)
    vals = (bits & np.uint16(0x807F)) | np.uint16(0x3C00)
    if model:
        vals ^= np.random.Generator(np.random.SFC64(2000 + model)).integers(0, 8, _POOL_ELEMENTS, dtype=np.uint16)
    return torch.from_numpy(vals.view(np.int16)).view(torch.bfloat16)


def _pool_slice(pool: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    start = (counter * 7919 * 4099) % (pool.numel() - n)
    return pool[start:start + n]


def build_large(cache: str, shape: dict) -> int:
    """Write the base and three fine-tunes under ``cache`` (reused when complete); return their total bytes."""
    from ray_merge.demo import save_tokenizer
    from ray_merge.io.writer import ShardWriter

    spec = llama_tensors(shape)
    model_bytes = sum(math.prod(sh) for _, sh in spec) * 2
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
        "vocab_size": shape["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
    }
    names = ["base", "ft0", "ft1", "ft2"]
    for k, name in enumerate(names):
        d = os.path.join(cache, name)
        if os.path.exists(os.path.join(d, "config.json")):
            continue
        need = model_bytes + 8 * 1024**3
        if disk_free(cache) < need:
            sys.exit(f"bench_merge.py: --large needs {need / 1e9:.1f} GB free under {cache} for {name} (8 GiB kept "
                     f"free); {disk_free(cache) / 1e9:.1f} GB are")
        print(f"writing {name}: {model_bytes / 1e9:.1f} GB ({shape['layers']} layers) in {d} ...", file=sys.stderr)
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shards, current, size = [], [], 0
        for tname, sh in spec:
            n = math.prod(sh) * 2
            if current and size + n > LARGE_SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append((tname, sh))
            size += n
        shards.append(current)
        weight_map = {}
        pool, counter = _bf16_pool(k), 0
        for i, tensors in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = ShardWriter(os.path.join(tmp, fn), [(t, sh, "bfloat16") for t, sh in tensors])
            for t, sh in tensors:
                weight_map[t] = fn
                if len(sh) == 1:
                    writer.write(t, torch.ones(sh, dtype=torch.bfloat16))
                    continue
                rows = max(1, _CHUNK_ELEMENTS // sh[1])
                for start in range(0, sh[0], rows):
                    m = min(rows, sh[0] - start)
                    writer.write_rows(t, _pool_slice(pool, counter, m * sh[1]).reshape(m, sh[1]))
                    counter += 1
            writer.close()
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": model_bytes}, "weight_map": weight_map}, f)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_tokenizer(tmp)
        os.replace(tmp, d)
    return 4 * model_bytes


def recipe_models(recipe_text: str) -> list[str]:
    """The model directories a recipe reads (base model included), in order."""
    import yaml

    r = yaml.safe_load(recipe_text)
    paths = [m["model"] for m in r.get("models", [])]
    if r.get("base_model"):
        paths.append(r["base_model"])
    return list(dict.fromkeys(paths))


def floor_time(model_dirs: list[str], out_dir: str, out_bytes: int) -> tuple[int, float, float, bool]:
    """(bytes read, read s, write s, caches dropped): read every weight file of ``model_dirs`` once from a cold
    cache, then write ``out_bytes`` to a file and fdatasync it: no merge of those inputs can take less than the
    sum of the two times."""
    dropped = drop_caches()
    read_bytes, read_s = 0, 0.0
    for d in model_dirs:
        n, t = read_throughput(d)
        read_bytes, read_s = read_bytes + n, read_s + t
    block = os.urandom(1 << 26)
    path = os.path.join(out_dir, "floor-write.tmp")
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(block[:min(left, len(block))])
        os.fdatasync(fh.fileno())
    write_s = time.perf_counter() - start
    os.remove(path)
    return read_bytes, read_s, write_s, dropped


def bench_large(args, env: dict) -> None:
    total_ram = psutil.virtual_memory().total
    shape = large_shape(int(1.5 * total_ram))
    cache = os.path.join(args.cache, "large")
    os.makedirs(cache, exist_ok=True)
    models = os.path.join(cache, "models")
    os.makedirs(models, exist_ok=True)
    inputs = build_large(models, shape)
    model_bytes = inputs // 4
    work = os.path.join(cache, "runs")
    os.makedirs(work, exist_ok=True)
    if disk_free(work) < model_bytes + 8 * 1024**3:
        sys.exit(f"bench_merge.py: the output ({model_bytes / 1e9:.1f} GB) needs room beside 8 GiB kept free under "
                 f"{work}; {disk_free(work) / 1e9:.1f} GB are free")
    print(f"inputs: 4 x {model_bytes / 1e9:.1f} GB = {inputs / 1e9:.1f} GB = {inputs / total_ram:.2f}x RAM "
          f"({total_ram / 2**30:.1f} GiB); {shape['layers']} layers, hidden {shape['hidden']}", flush=True)
    rows, floors = [], {}
    for method in args.methods.split(","):
        text = RECIPES[method].format(c=models)
        recipe = os.path.join(work, f"{method}.yml")
        with open(recipe, "w") as f:
            f.write(text)
        # the floor of this recipe: its own inputs read, its output written
        read_bytes, read_s, write_s, dropped = floor_time(recipe_models(text), work, model_bytes)
        floors[method] = read_s + write_s
        print(f"{method} floor: read {read_bytes / 1e9:.1f} GB in {read_s:.1f} s ({read_bytes / read_s / 1e9:.2f} GB/s)"
              f" + write {model_bytes / 1e9:.1f} GB in {write_s:.1f} s ({model_bytes / write_s / 1e9:.2f} GB/s, "
              f"fdatasync) = {floors[method]:.1f} s; page cache "
              f"{'dropped before each run' if dropped else 'NOT dropped (not root)'}", flush=True)
        rows.append((method, run_tools(method, recipe, work, args, env)))
    print_table(rows, args)
    budget = f"; --memory-budget {args.memory_budget} for ray-merge" if args.memory_budget else ""
    print(f"\nfloor: the recipe's inputs read once + fdatasync'd write of the output{budget}")
    for method, results in rows:
        for label, runs in results.items():
            for r in runs:
                if r.rc == 0:
                    print(f"{method} {label}: {r.wall:.1f} s = {r.wall / floors[method]:.2f}x the floor "
                          f"({floors[method]:.1f} s), peak RSS {r.rss:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(REPO, "bench_cache"))
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--mergekit", default=os.path.join(os.environ.get("MERGEKIT_VENV", os.path.join(REPO, ".venv-mergekit")),
                                                       "bin", "mergekit-yaml"))
    ap.add_argument("--no-mergekit", action="store_true", help="time ray-merge only")
    ap.add_argument("--memory-budget", default=None, help="pass --memory-budget to ray-merge")
    ap.add_argument("--workers", default="", help="also run ray-merge with --workers N for each N (e.g. 1,2)")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES),
                    help="1b: the 1.1B Llama-shaped models (default); tiny: a quick check of the script")
    ap.add_argument("--contended", type=int, default=0, metavar="N",
                    help="run every tool beside N busy processes (started and stopped by this script)")
    ap.add_argument("--repeat", type=int, default=1, metavar="K", help="run each tool K times, interleaved")
    ap.add_argument("--large", action="store_true",
                    help="models whose files total 1.5x RAM (built once under CACHE/large), cold cache, vs the floor")
    ap.add_argument("--json", default=None, help="where to write the throughputs (default CACHE/bench.json)")
    args = ap.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    busy = start_busy(args.contended)
    try:
        if args.large:
            bench_large(args, env)
        else:
            bench(args, env)
    finally:
        stop_busy(busy)


def bench(args, env: dict) -> None:
    shape = SHAPES[args.shape]
    models = os.path.join(args.cache, "models" if args.shape == "1b" else f"models-{args.shape}")
    build_models(models, shape)
    warm_page_cache(models)
    work = os.path.join(args.cache, "runs")
    os.makedirs(work, exist_ok=True)
    rows, planned = [], {}
    for method in args.methods.split(","):
        recipe = os.path.join(work, f"{method}.yml")
        with open(recipe, "w") as f:
            f.write(RECIPES[method].format(c=models))
        planned[method] = planned_bytes(recipe)
        rows.append((method, run_tools(method, recipe, work, args, env)))
    print_table(rows, args)
    if args.contended:
        return  # rates measured beside busy processes mean little: no bench.json

    read_bytes, read_s = read_throughput(models)
    write_bytes, write_s = write_throughput(work, max(written for _, written in planned.values()))
    startup_s = measure([sys.executable, "-m", "ray_merge.cli", "plan", os.path.join(work, f"{rows[0][0]}.yml")],
                        env).wall
    io = {"read_bytes": read_bytes, "read_s": read_s, "write_bytes": write_bytes, "write_s": write_s,
          "startup_s": startup_s}
    note = (f"scripts/bench_merge.py --shape {args.shape}: ray-merge in process on this machine; rates as in the "
            f"script's docstring")
    path = args.json or os.path.join(args.cache, "bench.json")
    with open(path, "w") as f:
        json.dump(bench_json(rows, planned, io, shape, note), f, indent=2)
    print(f"\nread {read_bytes / read_s / 1e9:.2f} GB/s, write {write_bytes / write_s / 1e9:.2f} GB/s, "
          f"start-up {startup_s:.1f} s; "
          f"throughputs in {path} (ray-merge plan --throughput-from {path})")


if __name__ == "__main__":
    main()
