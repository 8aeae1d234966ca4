"""Cheap fitness: candidates scored on a subsample of each task's examples, and how well that ranks them.

``evaluation.subsample: {size, mode, seed}`` scores every candidate on ``size`` examples per task: a new draw
each generation (``per_generation``) or one fixed draw (``anchor``). The draw is a function of the seed, the
generation (the "round": 0 for the anchor, generation + 1 otherwise), the task's name and its number of
examples only, so an evaluator computes it where the task is loaded, the driver needs no dataset, and a
resumed search scores every candidate exactly as the uninterrupted one did.

The top ``rescore_top`` candidates (by their cheap combined score) are scored again on the full sets at the
end of each session (and every ``rescore_every`` generations); ``agreement`` compares the two rankings
(Spearman's and Kendall's rank correlations, and whether the cheap best is the full best).
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import numpy as np

MODES = ("per_generation", "anchor")


def subsample_round(mode: str, generation: int) -> int:
    """The draw a candidate of ``generation`` is scored on (0: the anchor draw)."""
    return 0 if mode == "anchor" else generation + 1


def full_size(n_docs: int, limit: Optional[float]) -> int:
    """Examples of a task the full set holds: all of them, or ``evaluation.limit``'s share (as lm-eval counts it)."""
    if limit is None:
        return n_docs
    return min(n_docs, int(math.ceil(n_docs * limit)) if limit < 1 else int(limit))


def subsample_indices(n_docs: int, size: int, seed: int, round_: int, task: str) -> list[int]:
    """``size`` distinct example indices in [0, n_docs), sorted; all of them when the task has no more.
    Deterministic in (seed, round, task name, n_docs)."""
    if size >= n_docs:
        return list(range(n_docs))
    entropy = [seed % 2**32, round_ % 2**32, zlib.crc32(task.encode("utf-8"))]
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    return sorted(int(i) for i in rng.choice(n_docs, size=size, replace=False))


def samples_for(task_sizes: dict[str, int], spec: dict, limit: Optional[float] = None) -> dict[str, list[int]]:
    """lm-eval's ``samples=`` argument (task -> example indices) for a candidate's ``spec``
    ({size, seed, round}); ``task_sizes``: each task's number of evaluation examples."""
    return {name: subsample_indices(full_size(n, limit), int(spec["size"]), int(spec["seed"]), int(spec["round"]),
                                    name)
            for name, n in task_sizes.items()}


# --------------------------------------------------------------------------------------------------------
# re-scoring on the full sets, and the agreement of the two rankings
# --------------------------------------------------------------------------------------------------------
def rescore_points(last_generation: int, every: Optional[int]) -> list[int]:
    """The generations after which the top candidates are re-scored during the search (every K)."""
    if not every:
        return []
    return [g for g in range(every - 1, last_generation + 1, every)]


def top_candidates(history: list[dict], k: int, up_to_generation: Optional[int] = None) -> list[dict]:
    """The ``k`` best scored candidates by cheap combined score (ties: the earlier candidate by generation and
    index, never the finishing order, which parallel evaluators make differ between runs and resumes)."""
    ok = [r for r in history if r.get("status") == "ok" and r.get("generation", -1) >= 0
          and (up_to_generation is None or r["generation"] <= up_to_generation)]
    ok.sort(key=lambda r: (-r["score"], r["generation"], r.get("index", 0), r["id"]))
    return ok[:k]


def _nan_to_none(v: float) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else float(v)


def agreement(cheap: list[float], full: list[float]) -> dict:
    """How the cheap scores rank ``n`` candidates against their full-set scores: Spearman's rho and Kendall's
    tau-b (None when undefined: fewer than two candidates or a constant ranking), and whether the cheap best
    (the first in ``cheap`` among the highest) has the highest full score."""
    from scipy.stats import kendalltau, spearmanr

    n = len(cheap)
    out = {"n": n, "spearman": None, "kendall": None, "cheap_best_is_full_best": None, "cheap_best_full_rank": None}
    if n == 0:
        return out
    c, f = np.asarray(cheap, dtype=float), np.asarray(full, dtype=float)
    if n >= 2 and np.ptp(c) > 0 and np.ptp(f) > 0:
        out["spearman"] = _nan_to_none(spearmanr(c, f).statistic)
        out["kendall"] = _nan_to_none(kendalltau(c, f).statistic)
    best = int(np.argmax(c))
    out["cheap_best_is_full_best"] = bool(f[best] >= f.max())
    out["cheap_best_full_rank"] = int(1 + np.sum(f > f[best]))  # 1: no candidate scores higher on the full sets
    return out


def agreement_report(history: list[dict], rescored: dict[str, dict], spec: dict, last_generation: int) -> dict:
    """``subsample_agreement.json``: one check per re-scoring point (every ``rescore_every`` generations) and
    the final one (the top ``rescore_top`` of the whole history), each over the candidates re-scored there."""
    k = int(spec["rescore_top"])
    checks = []
    points = [(g, g) for g in rescore_points(last_generation, spec.get("rescore_every"))]
    if not points or points[-1][0] != last_generation:
        points.append((last_generation, None))
    for g, upto in points:
        top = [r for r in top_candidates(history, k, upto) if (rescored.get(r["id"]) or {}).get("status") == "ok"]
        if not top:
            continue
        full = [rescored[r["id"]]["score"] for r in top]
        check = {"after_generation": g, "ids": [r["id"] for r in top],
                 "cheap_scores": [r["score"] for r in top], "full_scores": full,
                 **agreement([r["score"] for r in top], full)}
        check["full_best_id"] = top[int(np.argmax(full))]["id"]
        checks.append(check)
    return {"size": spec["size"], "mode": spec["mode"], "seed": spec["seed"], "rescore_top": k,
            "rescore_every": spec.get("rescore_every"), "checks": checks,
            "final": checks[-1] if checks else None}


def agreement_line(report: dict) -> str:
    """One line of summary.txt."""
    final = report.get("final")
    if not final:
        return "subsample: no candidate re-scored on the full sets yet"

    def num(v):
        return "n/a" if v is None else f"{v:+.3f}"

    return (f"subsample ({report['size']} examples/task, {report['mode']}): top {final['n']} re-scored on the full "
            f"sets: Spearman {num(final['spearman'])}, Kendall {num(final['kendall'])}; cheap best "
            + ("is" if final["cheap_best_is_full_best"] else f"is not (full rank {final['cheap_best_full_rank']})")
            + f" the full best ({final['full_best_id']})")
