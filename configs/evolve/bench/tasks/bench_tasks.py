"""Dataset loaders of the honest benchmark's lm-eval tasks (``bench_add.yaml`` etc.).

As in configs/evolve/tasks/demo_tasks.py, the YAMLs use ``custom_dataset: !function bench_tasks.<loader>`` so
that the JSONL files are found next to this file whatever the working directory.  The files are written by
``python -m evolve.bench_models --write-task-data`` from a fixed seed; no model is trained on them.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str):
    import datasets

    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m evolve.bench_models --write-task-data`")
    return datasets.load_dataset("json", data_files={"test": str(path)})


# lm-eval calls these as custom_dataset(**metadata, **dataset_kwargs).
def add_search(**_kwargs):
    return _load("add_search")


def add_final(**_kwargs):
    return _load("add_final")


def rev_search(**_kwargs):
    return _load("rev_search")


def rev_final(**_kwargs):
    return _load("rev_final")
