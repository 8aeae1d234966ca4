"""The Pareto front of a multi-objective search: each task's weighted metric is an objective, maximised
(a negative task weight: lower is better, as in the combined score).

The front is taken over every scored evaluation of the search (not only NSGA-II's current population), with
pymoo's non-dominated sorting; candidates with the same scores on every task count once (the earliest).
``write_front`` writes it as runnable recipes ``pareto/front_NNN.yml`` and ``pareto.json``;
``plot_front`` draws ``pareto.png``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from evolve.stages import recipe_yaml, run_command
from evolve.storage import Storage


def objectives(scores: dict, tasks: list) -> np.ndarray:
    """The objective vector (maximised) of a candidate's per-task scores."""
    return np.array([_weight(t) * float(scores[_name(t)]) for t in tasks], dtype=float)


def _name(t) -> str:
    return t["name"] if isinstance(t, dict) else t.name


def _weight(t) -> float:
    return float(t["weight"] if isinstance(t, dict) else t.weight)


def non_dominated(points: np.ndarray) -> list[int]:
    """Indices of the rows no other row dominates (maximisation), in row order."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(points) == 0:
        return []
    return sorted(int(i) for i in NonDominatedSorting().do(-np.asarray(points, dtype=float),
                                                           only_non_dominated_front=True))


def pareto_front(history: list[dict], tasks: list) -> list[dict]:
    """The scored candidates on the front, one per distinct score vector (the earliest candidate by generation
    and index, never the finishing order, which differs between runs), ordered by the first objective (best
    first), then by id."""
    ok = sorted((r for r in history if r.get("status") == "ok" and r.get("generation", -1) >= 0),
                key=lambda r: (r["generation"], r.get("index", 0), r["id"]))
    seen: dict[tuple, dict] = {}
    for r in ok:
        seen.setdefault(tuple(objectives(r["scores"], tasks)), r)
    distinct = list(seen.values())
    pts = np.array([objectives(r["scores"], tasks) for r in distinct])
    front = [distinct[i] for i in non_dominated(pts)]
    return sorted(front, key=lambda r: (-objectives(r["scores"], tasks)[0], r["id"]))


def write_front(storage, history: list[dict], tasks: list) -> list[dict]:
    """``pareto/front_NNN.yml`` (each a recipe ``ray-merge run`` takes) and ``pareto.json``; front files of an
    earlier, larger front are removed. Returns the front."""
    front = pareto_front(history, tasks)
    sub = Storage(storage.file("pareto"))
    os.makedirs(sub.path, exist_ok=True)
    names = []
    for i, r in enumerate(front):
        name = f"front_{i:03d}.yml"
        scores = ", ".join(f"{k} {v:.4f}" for k, v in r["scores"].items())
        header = (f"# ray-merge evolve: Pareto front member {i} of {len(front)}: candidate {r['id']}, combined "
                  f"score {r['score']:.6g} ({scores})\n# run it with: {run_command(r['recipe'], name)}\n")
        sub.write_atomic(name, header + recipe_yaml(r["recipe"]))
        names.append(name)
    for name in sorted(os.listdir(sub.path)):
        if name.startswith("front_") and name.endswith(".yml") and name not in names:
            os.unlink(sub.file(name))
    doc = {"objectives": [{"task": _name(t), "weight": _weight(t)} for t in tasks],
           "evaluations": sum(1 for r in history if r.get("generation", -1) >= 0),
           "front": [{"file": os.path.join("pareto", n), "id": r["id"], "generation": r["generation"],
                      "scores": r["scores"], "score": r["score"],
                      "objectives": [float(v) for v in objectives(r["scores"], tasks)]}
                     for n, r in zip(names, front)]}
    storage.write_atomic("pareto.json", json.dumps(doc, indent=1))
    return front


def plot_front(path: str, history: list[dict], tasks: list, inputs: list[dict]) -> None:
    """The first two tasks' scores of every evaluation, the front highlighted (joined as a staircase), the
    input models marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = _name(tasks[0]), _name(tasks[1])
    ok = [r for r in history if r.get("status") == "ok" and r.get("generation", -1) >= 0]
    front = pareto_front(history, tasks)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    if ok:
        gens = np.array([r["generation"] for r in ok])
        sc = ax.scatter([r["scores"][a] for r in ok], [r["scores"][b] for r in ok], c=gens, cmap="Blues", s=16,
                        alpha=0.8, vmin=-max(1, gens.max()) * 0.3, label="candidate")
        from matplotlib.ticker import MaxNLocator

        bar = fig.colorbar(sc, ax=ax, label="generation")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar.ax.set_ylim(0, max(1, gens.max()))
    if front:
        fx = [r["scores"][a] for r in front]
        fy = [r["scores"][b] for r in front]
        order = np.argsort(fx)
        # the boundary of what the front dominates (both objectives maximised)
        ax.step(np.array(fx)[order], np.array(fy)[order], where="pre", color="tab:red", lw=1, alpha=0.6)
        title = "front" if len(tasks) == 2 else f"front over all {len(tasks)} objectives"
        ax.scatter(fx, fy, s=46, facecolors="none", edgecolors="tab:red", lw=1.6, label=title)
    markers = ["s", "^", "D", "v", "P", "X"]
    for j, r in enumerate(x for x in inputs if x.get("status") == "ok"):
        ax.scatter([r["scores"][a]], [r["scores"][b]], marker=markers[j % len(markers)], s=50, color="black",
                   label=f"input {r['id'].split(':', 1)[-1]}")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.set_title(f"Pareto front: {len(front)} of {len(ok)} evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
