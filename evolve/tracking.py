"""Metrics of a search as it runs: TensorBoard event files under ``STORAGE/tensorboard`` (always, when the
``tensorboard`` package is installed) and Weights & Biases (with ``--wandb``, when ``wandb`` is installed).

Per evaluation (step: the evaluation's number): ``eval/<task>`` (each task's metric), ``eval/score`` (the
combined score) and ``eval/best_so_far``. Per generation (step: the generation): ``generation/<task>`` and
``generation/score`` (the generation's best candidate), ``generation/score_mean`` and
``generation/best_so_far``. A resumed search adds a new event file to the same directory; its steps go on.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


class Tracker:
    def __init__(self, logdir: str, say: Callable[[str], None], wandb: Optional[dict] = None,
                 config: Optional[dict] = None):
        """``wandb``: None (off), or the arguments of ``wandb.init`` (project, entity)."""
        self.writer = None
        self.run = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            say("note: TensorBoard logs are off (install the tensorboard package to get them)")
        else:
            self.writer = SummaryWriter(logdir, flush_secs=30)
        if wandb is not None:
            try:
                import wandb as wandb_module
            except ImportError:
                say("note: --wandb: wandb is not installed; metrics go to TensorBoard only")
            else:
                self.run = wandb_module.init(project=wandb.get("project") or "ray-merge-evolve",
                                             entity=wandb.get("entity"), config=config)

    def _log(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.run is not None:
            self.run.log(values)

    def evaluation(self, record: dict, best_score: Optional[float]) -> None:
        """One finished candidate (a history record)."""
        if record.get("status") != "ok":
            return
        values = {f"eval/{t}": v for t, v in (record.get("scores") or {}).items()}
        values.update({"eval/score": record["score"], "eval/best_so_far": best_score})
        self._log(values, record["eval_number"])

    def generation(self, generation: int, records: list[dict], best_score: Optional[float]) -> None:
        """A finished generation (its history records)."""
        ok = [r for r in records if r.get("status") == "ok"]
        values: dict = {"generation/best_so_far": best_score, "generation/failed": len(records) - len(ok)}
        if ok:
            top = max(ok, key=lambda r: r["score"])
            values.update({f"generation/{t}": v for t, v in (top.get("scores") or {}).items()})
            values.update({"generation/score": top["score"],
                           "generation/score_mean": float(np.mean([r["score"] for r in ok]))})
        self._log(values, generation)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
