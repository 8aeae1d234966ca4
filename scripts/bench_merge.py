"""Benchmark `ray-merge run` against `mergekit-yaml` on a ~1B-parameter Llama-shaped model.

Builds (or reuses, under --cache) a base and three fine-tunes (bf16, sharded safetensors),
then for each method runs mergekit and ray-merge in this same run and prints wall
time, peak RSS (process tree, sampled) and the ratios. Writes the measured throughputs to
bench.json (--json), for `ray-merge plan --throughput-from bench.json`.

    python scripts/bench_merge.py                       # all methods, both tools
    python scripts/bench_merge.py --methods linear,ties --memory-budget 2GiB
    python scripts/bench_merge.py --workers 1,2         # ray-merge on Ray with N workers too
    python scripts/bench_merge.py --shape tiny --no-mergekit --methods ties   # seconds: checks the script

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
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

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
        wall, _, rc = results["ray-merge"]
        if rc != 0:
            continue
        rest = max(0.0, wall - io["startup_s"] - read / read_rate - written / write_rate)
        methods[method] = {
            "bytes_read": read, "bytes_written": written, "wall_s": round(wall, 3),
            "read_bytes_per_s": read_rate, "write_bytes_per_s": write_rate, "compute_s_per_byte": rest / written,
            "runs": {label: round(w, 3) for label, (w, _, code) in results.items() if code == 0},
        }
    model_bytes = sum(torch.Size(sh).numel() for _, sh in llama_tensors(shape)) * 2
    return {"schema": 1, "note": note, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "shape": shape, "dtype": "bfloat16", "model_bytes": model_bytes, "io": io, "methods": methods}


def measure(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Run a command; return (wall seconds, peak RSS of its process tree in GB, exit code)."""
    os.sync()  # the previous run's output is on disk: its write-back does not load this run
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
    return wall, peak / 1e9, proc.returncode


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
    ap.add_argument("--json", default=None, help="where to write the throughputs (default CACHE/bench.json)")
    args = ap.parse_args()

    shape = SHAPES[args.shape]
    models = os.path.join(args.cache, "models" if args.shape == "1b" else f"models-{args.shape}")
    build_models(models, shape)
    warm_page_cache(models)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    work = os.path.join(args.cache, "runs")
    os.makedirs(work, exist_ok=True)
    rows, planned = [], {}
    for method in args.methods.split(","):
        recipe = os.path.join(work, f"{method}.yml")
        with open(recipe, "w") as f:
            f.write(RECIPES[method].format(c=models))
        planned[method] = planned_bytes(recipe)
        variants = [("ray-merge", [])]
        variants += [(f"ray-merge --workers {n}", ["--workers", n]) for n in args.workers.split(",") if n]
        results = {}
        if not args.no_mergekit:
            out = os.path.join(work, f"mk_{method}")
            shutil.rmtree(out, ignore_errors=True)
            results["mergekit"] = measure([args.mergekit, recipe, out, "--random-seed", "0"], env)
            shutil.rmtree(out, ignore_errors=True)
        for label, extra in variants:
            out = os.path.join(work, f"rm_{method}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + ".ray-merge-partial", ignore_errors=True)  # left by an interrupted run
            cmd = [sys.executable, "-m", "ray_merge.cli", "run", recipe, out, "--random-seed", "0", "--quiet", *extra]
            if args.memory_budget:
                cmd += ["--memory-budget", args.memory_budget]
            results[label] = measure(cmd, env)
            shutil.rmtree(out, ignore_errors=True)
        rows.append((method, results))
        for label, (wall, rss, rc) in results.items():
            print(f"{method:16s} {label:24s} {wall:7.1f} s  {rss:5.2f} GB peak RSS  rc={rc}", flush=True)

    print()
    print("| method | tool | wall (s) | peak RSS (GB) | speed-up vs mergekit | RSS vs mergekit |")
    print("|---|---|---|---|---|---|")
    for method, results in rows:
        mk = results.get("mergekit")
        for label, (wall, rss, rc) in results.items():
            speed = f"{mk[0] / wall:.1f}x" if mk and label != "mergekit" and rc == 0 else ""
            mem = f"{rss / mk[1]:.2f}" if mk and label != "mergekit" and rc == 0 and mk[1] else ""
            print(f"| {method} | {label} | {wall:.1f} | {rss:.2f} | {speed} | {mem} |")

    read_bytes, read_s = read_throughput(models)
    write_bytes, write_s = write_throughput(work, max(written for _, written in planned.values()))
    startup_s = measure([sys.executable, "-m", "ray_merge.cli", "plan", os.path.join(work, f"{rows[0][0]}.yml")],
                        env)[0]
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
