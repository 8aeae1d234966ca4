"""What a search keeps under ``--storage-path``.

- ``config.yml``       the resolved config (absolute paths) the search runs with; ``meta.json`` its scoring hash
- ``history.jsonl``    one line per finished candidate: id, generation, genotype, recipe, per-task scores,
                       score, fitness, status (ok / failed + error), attempts (worker, timings), ...
- ``inputs.jsonl``     the input models' scores (``evaluation.score_inputs``)
- ``checkpoint.npz``   the CMA-ES state after each generation: numbers only (numpy's npz, read with
                       ``allow_pickle=False``: nothing in it can run as code): what the strategy started from
                       and was told since, the RNG states, the generation's population and candidate ids
                       (evolve.searcher replays them)
- ``best_config.yml``  the best recipe so far, as ``ray-merge run`` takes it; ``best.json`` its scores
- ``progress.png``, ``best_params.png``, ``summary.txt``  the report, refreshed after every generation
- ``tensorboard/``     TensorBoard event files (per evaluation and per generation)

Every file except the history is written under a temporary name and renamed; history lines are appended
and fsynced one at a time, and a line cut short by a kill is dropped when the search resumes.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Optional

import numpy as np
import yaml

from evolve.stages import recipe_yaml, run_command
from ray_merge.errors import UserError

CHECKPOINT_VERSION = 2
CHECKPOINT = "checkpoint.npz"
CHECKPOINT_FORMAT = "ray-merge evolve checkpoint"
LEGACY_CHECKPOINT = "checkpoint.pkl"  # written by earlier versions: a pickle, never loaded
# the checkpoint's arrays: name -> (dtype kind, number of dimensions)
CHECKPOINT_ARRAYS = {"meta": ("U", 0), "rng_key": ("u", 2), "rng_pos": ("i", 1), "rng_has_gauss": ("i", 1),
                     "rng_cached_gaussian": ("f", 1)}
_UMASK = os.umask(0)
os.umask(_UMASK)


class Storage:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- set-up -------------------------------------------------------------------------------------------
    def has_search(self) -> bool:
        """Whether a search has evaluated or proposed anything here (config.yml and meta.json alone: not yet)."""
        return any(os.path.exists(self.file(n)) for n in (CHECKPOINT, LEGACY_CHECKPOINT, "history.jsonl"))

    def start(self, cfg, resume: bool) -> None:
        """A new search (the directory must hold none), or a resumed one (the same scoring settings)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError("not a directory", source=self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the storage directory: {e.strerror or e}", source=self.path)
        if not os.access(self.path, os.W_OK):
            raise UserError("storage directory is not writable", source=self.path)
        if resume:
            if not self.has_search() and not os.path.exists(self.file("meta.json")):
                raise UserError("nothing to resume: no search here (run without --resume to start one)",
                                source=self.path)
            self._check_same(cfg)
            self._repair_history()
            if self.has_search():
                return
        elif self.has_search():
            raise UserError("already holds a search: pass --resume to continue it, or pick another "
                            "--storage-path", source=self.path)
        self.write_atomic("config.yml", yaml.safe_dump(cfg.raw, sort_keys=False))
        self.write_atomic("meta.json", json.dumps({"scoring_hash": cfg.scoring_hash,
                                                   "scoring": cfg.scoring_view()}, indent=1, default=str))

    def _check_same(self, cfg) -> None:
        try:
            with open(self.file("meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return  # a search killed before meta.json: nothing to compare
        if meta.get("scoring_hash") == cfg.scoring_hash:
            return
        old = meta.get("scoring") or {}
        new = json.loads(json.dumps(cfg.scoring_view(), default=str))
        key = next((k for k in new if old.get(k) != new.get(k)), "?")
        raise UserError(f"{key} differs from the search stored in {self.path}; a resumed search must score "
                        "candidates the same way (start a new --storage-path to change it)", source=cfg.source)

    # -- files ------------------------------------------------------------------------------------------
    def write_atomic(self, name: str, data, binary: bool = False) -> str:
        path = self.file(name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            with os.fdopen(fd, "wb" if binary else "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    # -- history ----------------------------------------------------------------------------------------
    def _repair_history(self) -> None:
        """Drop a last line cut short by a kill, so that appends start on a fresh line."""
        for name in ("history.jsonl", "inputs.jsonl", "rescored.jsonl"):
            path = self.file(name)
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data[: data.rfind(b"\n") + 1]
                with open(path, "r+b") as f:
                    f.truncate(len(keep))

    def _read_jsonl(self, name: str) -> list[dict]:
        path = self.file(name)
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a kill
        return out

    def _append_jsonl(self, name: str, record: dict) -> None:
        with open(self.file(name), "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_history(self) -> list[dict]:
        return self._read_jsonl("history.jsonl")

    def append_history(self, record: dict) -> None:
        self._append_jsonl("history.jsonl", record)

    def read_inputs(self) -> list[dict]:
        return self._read_jsonl("inputs.jsonl")

    def append_input(self, record: dict) -> None:
        self._append_jsonl("inputs.jsonl", record)

    # -- checkpoint -------------------------------------------------------------------------------------
    def save_checkpoint(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """``meta`` (JSON-able) and ``arrays`` (numbers) as one npz file, written atomically."""
        meta = dict(meta, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta, default=_json_default)), **arrays)
        self.write_atomic(CHECKPOINT, buf.getvalue(), binary=True)

    def load_checkpoint(self) -> Optional[tuple[dict, dict[str, np.ndarray]]]:
        """(meta, arrays) of the checkpoint, or None when there is none. Only numbers and JSON are read
        (``allow_pickle=False``); anything else is a one-line UserError."""
        path = self.file(CHECKPOINT)
        if not os.path.exists(path):
            if os.path.exists(self.file(LEGACY_CHECKPOINT)):
                raise UserError(f"{LEGACY_CHECKPOINT} is a pickle written by an earlier ray-merge; it is not "
                                "loaded (a pickle can run code): start the search again in a new --storage-path",
                                source=self.file(LEGACY_CHECKPOINT))
            return None

        def bad(msg: str) -> UserError:
            return UserError(f"not a ray-merge evolve checkpoint ({msg})", source=path)

        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except Exception as e:  # noqa: BLE001 - not an npz, a pickle, object arrays, a damaged zip ...
            raise bad(f"{type(e).__name__}: {e}".splitlines()[0])
        for name, (kind, ndim) in CHECKPOINT_ARRAYS.items():
            a = arrays.get(name)
            if a is None or a.dtype.kind != kind or a.ndim != ndim:
                raise bad(f"{name}: missing or not a {ndim}-d array of kind {kind!r}")
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except ValueError as e:
            raise bad(f"meta: {e}")
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise bad("no format marker")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise bad(f"version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
        return meta, arrays

    # -- best -------------------------------------------------------------------------------------------
    def write_best(self, record: dict, n_evaluated: int) -> None:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in (record.get("scores") or {}).items())
        header = (f"# ray-merge evolve: best of {n_evaluated} evaluation(s) so far: candidate {record['id']}, "
                  f"score {record['score']:.6g} ({scores})\n"
                  f"# run it with: {run_command(record['recipe'], 'best_config.yml')}\n")
        self.write_atomic("best_config.yml", header + recipe_yaml(record["recipe"]))
        best = {k: record.get(k) for k in ("id", "generation", "score", "scores", "genotype", "values")}
        best["evaluations"] = n_evaluated
        self.write_atomic("best.json", json.dumps(best, indent=1, default=_json_default))


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
