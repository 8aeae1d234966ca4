"""Dataset loaders for the demo lm-eval tasks (``demo_arith.yaml`` etc.).

lm-eval hands ``dataset_kwargs: {data_files: ...}`` straight to
``datasets.load_dataset``, which resolves a relative path against the current
working directory, not against the YAML.  The task YAMLs therefore use
``custom_dataset: !function demo_tasks.<loader>``: lm-eval imports this file
from the YAML's own directory, and the loaders find the JSONL files next to it
whatever the working directory is.

The JSONL files are written by ``scripts/make_demo_models.py --write-task-data``
from a fixed seed; the demo models are never trained on them.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str):
    import datasets

    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; run `python scripts/make_demo_models.py --write-task-data`"
        )
    ds = datasets.load_dataset("json", data_files={"test": str(path)})
    return ds


# lm-eval calls these as custom_dataset(**metadata, **dataset_kwargs).
def arith_search(**_kwargs):
    return _load("arith_search")


def arith_final(**_kwargs):
    return _load("arith_final")


def reverse_search(**_kwargs):
    return _load("reverse_search")


def reverse_final(**_kwargs):
    return _load("reverse_final")
