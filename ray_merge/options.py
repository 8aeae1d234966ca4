"""Options of a merge, of its workers and of the evolve command: plain data, read by every layer.

This is also the table of command-line flags. Each option is described once, in its field's metadata
(made by ``option()``): its flags, the kind of value it takes and its help. ``ray_merge/cli/options.py``
turns a group of options (a dataclass here) into argparse arguments and the parsed arguments back into
the dataclass, so every command that takes an option takes the same flag with the same meaning.

Kinds of value: ``int``, ``float``, ``str``, ``size`` (bytes as people write them: 5B, 2GiB), ``switch``
(a flag that sets True), ``toggle`` (``--x`` / ``--no-x``), ``count`` (``-vv``), ``list`` (repeatable) and
``resources`` (repeatable NAME=AMOUNT, read into a dict).
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from typing import Optional

DEFAULT_SHARD_BYTES = 5_000_000_000  # output shard size (mergekit's default --out-shard-size)


def option(*flags: str, default=None, factory=MISSING, kind: str = "str", help: str = "", metavar=None,
           choices=None, required: bool = False, dest: Optional[str] = None, shortcut=None):
    """A dataclass field that a command-line flag sets.

    ``dest``: the argparse attribute (default: from the first long flag). ``shortcut``: (flag, value,
    help) of a second flag that sets the same option to a fixed value (``--cuda`` for ``--device cuda``).
    """
    meta = {"flags": flags, "kind": kind, "help": help, "metavar": metavar, "choices": choices,
            "required": required, "dest": dest, "shortcut": shortcut}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def in_ray_job() -> bool:
    """True when running as the entrypoint of a Ray job (`ray job submit -- ray-merge run ...`)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"))


@dataclass
class CommandFlags:
    """Flags of the commands that are not options of a merge: recipe overrides and log verbosity."""

    overrides: list = option("--set", factory=list, kind="list", metavar="KEY=VALUE", dest="overrides",
                             help="override a recipe value, e.g. --set parameters.t=0.3 (repeatable)")
    verbose: int = option("-v", "--verbose", default=0, kind="count")


@dataclass
class MergeOptions:
    device: str = option("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)",
                         shortcut=("--cuda", "cuda", "same as --device cuda"))
    random_seed: Optional[int] = option("--random-seed", kind="int",
                                        help="seed for randomised methods (default 0)")
    out_shard_bytes: int = option("--out-shard-size", default=DEFAULT_SHARD_BYTES, kind="size",
                                  help="max bytes per output shard (default 5B = 5e9, as mergekit)")
    memory_budget: Optional[int] = option(  # bytes; None: a safe share of RAM
        "--memory-budget", kind="size",
        help="peak memory for tensor work, e.g. 2GiB (default: 60%% of available RAM)")
    copy_tokenizer: bool = option("--copy-tokenizer", default=True, kind="toggle")
    write_model_card: bool = option("--write-model-card", default=True, kind="toggle")
    allow_crimes: bool = option("--allow-crimes", default=False, kind="switch",
                                help="allow merging different architectures")
    unsafe_truncate_embeddings: bool = option(
        "--unsafe-truncate-embeddings", default=False, kind="switch",
        help="UNSAFE: without tokenizer settings, keep only the embedding / lm_head rows every model has "
             "(mergekit's flag; assumes the token ids agree; use 'tokenizer:' instead)")
    trust_remote_code: bool = option("--trust-remote-code", default=False, kind="toggle",
                                     help="run the models' own code when loading their tokenizers and configs")
    resume: bool = option("--resume", default=False, kind="switch",
                          help="finish an interrupted merge, keeping finished shards")
    quiet: bool = option("--quiet", default=False, kind="switch", help="no progress bar or notes")
    storage_options: Optional[str] = option(  # JSON text (a dict from the Python API); read by io/storage
        "--storage-options", metavar="JSON",
        help="for an output URL (s3://bucket/prefix, gs://...): fsspec filesystem options as a JSON object, "
             "e.g. '{\"endpoint_url\": \"http://minio:9000\"}' (credentials: the usual AWS_* variables or ~/.aws)")
    extra: dict = field(default_factory=dict)


@dataclass
class WorkerSpec:
    """How many merge workers, where, and with what resources."""

    workers: Optional[int] = option(  # None with an address: one per node that fits a worker
        "--workers", kind="int", metavar="N",
        help="merge with N Ray worker actors; without --address a local Ray instance (127.0.0.1) is started "
             "(inside a Ray job: that job's cluster)")
    address: Optional[str] = option(  # None: a local Ray instance (or the cluster of the Ray job we run in)
        "--address", metavar="ADDR",
        help="join an existing Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default workers: one per node)")
    memory: Optional[int] = option(  # host bytes per worker (a Ray `memory` reservation and the budget)
        "--worker-memory", kind="size", metavar="SIZE",
        help="host memory per worker, e.g. 16GiB: reserved on the node (Ray's memory resource) and, for CPU "
             "workers, the worker's memory budget (default: a share of the node's memory)")
    gpus: float = option("--worker-gpus", default=0.0, kind="float", metavar="N",
                         help="GPUs per worker: the worker merges on its GPU and its memory budget is 90%% of "
                              "the GPU's memory (--memory-budget overrides)")
    cpus: float = option("--worker-cpus", default=1.0, kind="float", metavar="N", help="CPUs per worker (default 1)")
    resources: dict = option(  # custom Ray resources each worker needs
        "--worker-resource", factory=dict, kind="resources", metavar="NAME=AMOUNT",
        help="a custom Ray resource each worker needs, e.g. merge=1 to use only nodes started with "
             "--resources '{\"merge\": 4}' (repeatable)")
    start_timeout: float = option("--worker-start-timeout", default=300.0, kind="float", metavar="SECONDS",
                                  help="how long to wait for workers to start (autoscaling clusters: longer)")

    @property
    def remote(self) -> bool:
        """Workers run on a cluster we did not start (an address, or the cluster of our Ray job)."""
        return bool(self.address) or in_ray_job()


@dataclass
class PlanOptions:
    """`ray-merge plan`'s own flags."""

    throughput_from: Optional[str] = option(
        "--throughput-from", metavar="BENCH_JSON",
        help="estimate each worker's wall time from the per-byte throughputs measured for the recipe's method "
             "in this file (written by scripts/bench_merge.py): bytes read / read throughput + compute per "
             "output byte x bytes written + bytes written / write throughput, workers on separate nodes")


@dataclass
class EvolveOptions:
    """`ray-merge evolve`'s own flags (it also takes --set, --resume, --workers, --address, --random-seed,
    --allow-crimes, -v and --quiet from the groups above). The search reads the rest of its settings from its
    config. mergekit-evolve's flags are taken with their meaning; the few that mean nothing here say so."""

    storage_path: Optional[str] = option("--storage-path", required=True, metavar="DIR",
                                         help="where the history, checkpoints, best_config.yml and the report go")
    backend: Optional[str] = option("--backend", choices=("hf", "vllm"),
                                    help="evaluation backend (default: config)",
                                    shortcut=("--vllm", "vllm", "same as --backend vllm (mergekit-evolve's flag)"))
    max_fevals: Optional[int] = option("--max-fevals", kind="int",
                                       help="stop after this many evaluations (default: config)")
    max_time: Optional[float] = option("--max-time", "--timeout", kind="float", metavar="SECONDS",
                                       help="wall-clock budget of this session: stop after the generation that "
                                            "passes it, resumable (default: config's search.max_time_s; "
                                            "--timeout is mergekit-evolve's name)")
    patience: Optional[int] = option("--patience", kind="int", metavar="N",
                                     help="stop after N generations without a better best (default: config)")
    eval_timeout: Optional[float] = option("--eval-timeout", kind="float", metavar="SECONDS",
                                           help="per evaluation: a candidate past it is retried once on another "
                                                "evaluator (the hung one is replaced), then recorded as failed "
                                                "(default: config's evaluation.timeout_s; none)")
    popsize: Optional[int] = option("--popsize", "--force-population-size", kind="int",
                                    help="population size, CMA-ES or NSGA-II (default: config / 4 + 3 ln genes)")
    sigma0: Optional[float] = option("--sigma0", kind="float", help="CMA-ES initial step, in units of each range")
    limit: Optional[float] = option("--limit", kind="float", help="examples per task (lm-eval's limit)")
    batch_size: Optional[str] = option("--batch-size", help="lm-eval batch size (an integer or auto)")
    task_search_path: list = option("--task-search-path", factory=list, kind="list", metavar="DIR",
                                    help="more lm-eval task directories (as mergekit-evolve; repeatable)")
    num_gpus: Optional[int] = option("--num-gpus", kind="int", metavar="N",
                                     help="use N GPUs of the cluster: N evaluators, one GPU each")
    merge_cuda: Optional[bool] = option("--merge-cuda", kind="toggle",
                                        help="merge candidates on the evaluator's GPU (evaluation.merge_device "
                                             "auto) or on its CPU (--no-merge-cuda; default: config)")
    allow_benchmark_tasks: bool = option(
        "--allow-benchmark-tasks", "--i-understand-the-depths-of-the-evils-i-am-unleashing", kind="switch",
        default=False, dest="allow_benchmark_tasks", help="allow common benchmarks (mmlu, gsm8k, ...) as objectives")
    save_final_model: bool = option("--save-final-model", default=False, kind="toggle",
                                    help="merge the best recipe into STORAGE/final_model at the end (default "
                                         "off; mergekit-evolve's is on)")
    wandb: bool = option("--wandb", default=False, kind="toggle",
                         help="also log to Weights & Biases (when wandb is installed; TensorBoard logs are always "
                              "in STORAGE/tensorboard)")
    wandb_project: Optional[str] = option("--wandb-project", help="W&B project (default ray-merge-evolve)")
    wandb_entity: Optional[str] = option("--wandb-entity", help="W&B entity")
    strategy: Optional[str] = option("--strategy", "-s", choices=("pool", "buffered", "serial"),
                                     help="mergekit-evolve's scheduling: every strategy runs as pool here (an "
                                          "evaluator per GPU that merges the next candidate while it scores one)")
    in_memory: Optional[bool] = option("--in-memory", kind="toggle",
                                       help="no effect: candidates are always merged and scored in memory")
    reshard: Optional[bool] = option("--reshard", kind="toggle",
                                     help="no effect: inputs are read in place and kept resident in the evaluators")
    no_report: bool = option("--no-report", default=False, kind="switch", help="skip the plots and the summary")


# mergekit flags accepted for compatibility: they change nothing here, and say so
NOTED_FLAGS = {
    "--lazy-unpickle": "has no effect (reads are lazy and streamed)",
    "--no-lazy-unpickle": "has no effect (reads are lazy and streamed)",
    "--low-cpu-memory": "has no effect (reads are lazy and streamed)",
    "--read-to-gpu": "has no effect (reads are lazy and streamed)",
    "--async-write": "has no effect (reads are lazy and streamed)",
    "--multi-gpu": "has no effect: use --workers/--address to spread work over devices",
    "--load-in-4bit": "is not supported; the base model is run in bfloat16",
    "--load-in-8bit": "is not supported; the base model is run in bfloat16",
}
