"""The search's report: progress.png, best_params.png (pareto.png for NSGA-II) and a one-screen summary.txt
(matplotlib, Agg), rewritten after every generation and at the end."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from evolve.pareto import pareto_front, plot_front
from evolve.subsample import agreement_line


def worker_utilisation(history: list[dict], session: Optional[str] = None) -> dict[str, dict]:
    """Per evaluator: candidates, seconds scoring, and the share of its time spent scoring — from its first
    scoring start to its last scoring end, so actor start-up is not counted (it is reported apart)."""
    per: dict[str, dict] = {}
    for r in history:
        if session is not None and r.get("session") != session:
            continue
        for a in r.get("attempts") or []:
            if a.get("error") or "eval_s" not in a:
                continue
            w = per.setdefault(a["worker"], {"n": 0, "eval_s": 0.0, "build_s": 0.0, "first": 1e300, "last": 0.0})
            w["n"] += 1
            w["eval_s"] += a["eval_s"]
            w["build_s"] += a["build_s"]
            w["first"] = min(w["first"], a["eval_start"])
            w["last"] = max(w["last"], a["eval_end"])
    for w in per.values():
        span = max(1e-9, w["last"] - w["first"])
        w["span_s"] = span
        w["share"] = w["eval_s"] / span
    return per


def _generation_starts(hist: list[dict]) -> list[tuple[int, int]]:
    """(evaluation number, generation) where each generation's first evaluation lies."""
    starts: dict[int, int] = {}
    for i, r in enumerate(hist, 1):
        g = r.get("generation")
        if g is not None and g not in starts:
            starts[g] = i
    return sorted((i, g) for g, i in starts.items())


def plot_progress(path: str, history: list[dict], inputs: list[dict], tasks: Optional[list[str]] = None) -> None:
    """The combined score against evaluations (each candidate, the best so far, the inputs as lines), then one
    panel per task (each candidate's metric and the best so far on that task); generations marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = sorted(history, key=lambda r: r.get("eval_number", 0))
    tasks = list(tasks or [])
    fig, axes = plt.subplots(1 + len(tasks), 1, figsize=(8, 4.5 + 2.2 * len(tasks)), dpi=110, sharex=True,
                             gridspec_kw={"height_ratios": [2] + [1] * len(tasks)}, squeeze=False)
    axes = axes[:, 0]
    colors = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray", "tab:olive"]
    ok_inputs = [r for r in inputs if r.get("status") == "ok"]
    panels = [("combined score", lambda r: r["score"], lambda r: r["score"])]
    panels += [(t, lambda r, t=t: (r.get("scores") or {}).get(t), lambda r, t=t: (r.get("scores") or {}).get(t))
               for t in tasks]
    for ax, (name, value, input_value) in zip(axes, panels):
        xs, ys, fx, bx, best = [], [], [], [], []
        cur = -np.inf
        for i, r in enumerate(hist, 1):
            v = value(r) if r.get("status") == "ok" else None
            if v is None:
                fx.append(i)
            else:
                xs.append(i)
                ys.append(v)
                cur = max(cur, v)
            if np.isfinite(cur):
                bx.append(i)
                best.append(cur)
        ax.scatter(xs, ys, s=14, alpha=0.6, label="candidate", color="tab:blue")
        ax.step(bx, best, where="post", color="tab:red", lw=2, label="best so far")
        if fx:
            ax.scatter(fx, [min(ys) if ys else 0.0] * len(fx), marker="x", color="black", label="failed")
        for j, r in enumerate(ok_inputs):
            v = input_value(r)
            if v is not None:
                ax.axhline(v, ls="--", lw=1, color=colors[j % len(colors)], label=f"input {r['id'].split(':', 1)[-1]}")
        starts = _generation_starts(hist)
        for k, (i, g) in enumerate(starts):
            ax.axvline(i - 0.5, color="0.6", lw=0.6, ls=":")
            if ax is axes[0] and (len(starts) <= 12 or k % max(1, len(starts) // 12) == 0):
                ax.text(i - 0.4, 1.0, f"g{g}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4",
                        va="bottom")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title("evolutionary merge search (dotted lines: generations)", pad=14)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[-1].set_xlabel("evaluation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_best_params(path: str, genome, genotype) -> None:
    """The best recipe's parameters: a heat map over the layers when they vary by layer group, else one bar
    per value (a single group: each value holds for the whole model, not per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if genome.n_groups == 1:
        values = genome.values(genotype)
        labels = [genome.gene_label(g) for g in genome.genes]
        vals = [values[g] for g in genome.genes]
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.9 + 0.35 * len(labels))), dpi=110)
        ax.barh(range(len(labels)), vals, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_xlabel("parameter value (one value for the whole model)")
        ax.set_title("best recipe's parameters")
    else:
        labels, table = genome.layer_table(genotype)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 + 0.55 * table.shape[1]), max(2.5, 0.9 + 0.45 * len(labels))),
                               dpi=110)
        im = ax.imshow(table, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(table.shape[1]), [str(i) for i in range(table.shape[1])], fontsize=8)
        for g in range(1, genome.n_groups):
            if not genome.cfg.smooth:
                ax.axvline(g * genome.step - 0.5, color="white", lw=1)
        ax.set_xlabel("layer" + (" (interpolated between layer groups)" if genome.cfg.smooth else
                                 f" (groups of {genome.step})"))
        ax.set_title("best recipe's parameters by layer")
        if table.size <= 400:
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (table.min() + table.max()) / 2 else "black")
        fig.colorbar(im, ax=ax, label="parameter value")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_text(storage, genome, cfg, summary: dict) -> str:
    history = storage.read_history()
    inputs = storage.read_inputs()
    ok = [r for r in history if r.get("status") == "ok"]
    failed = [r for r in history if r.get("status") != "ok"]
    best = max(ok, key=lambda r: r["score"]) if ok else None
    tasks = [t.name for t in cfg.tasks]
    n_gen = 1 + max((r["generation"] for r in history), default=0)
    width = max([len(t) for t in tasks] + [8]) + 1
    lines = [f"ray-merge evolve: {cfg.name or os.path.basename(cfg.source)} — {genome.method.name}, "
             f"{genome.dim} genes, backend {cfg.evaluation.backend}",
             f"evaluations: {len(history)} ({len(failed)} failed) in {n_gen} generation(s); "
             f"stopped: {summary.get('stop_reason', '?')}"]
    head = f"{'model':<22}" + "".join(f"{t:>{width}}" for t in tasks) + f"{'combined':>{width}}"
    lines += ["", head]

    def row(name: str, scores: Optional[dict], score: Optional[float]) -> str:
        if scores is None:
            return f"{name:<22}" + "failed".rjust(width)
        return f"{name:<22}" + "".join(f"{scores[t]:>{width}.4f}" for t in tasks) + f"{score:>{width}.4f}"

    for r in inputs:
        lines.append(row(r["id"].split(":", 1)[-1][:22], r.get("scores"), r.get("score")))
    if best:
        lines.append(row(f"best merge ({best['id']})", best["scores"], best["score"]))
        ins = [r["score"] for r in inputs if r.get("status") == "ok"]
        if ins:
            lines.append(f"best merge vs best input: {best['score'] - max(ins):+.4f} (combined score)")
        first = next(r for r in sorted(ok, key=lambda r: r["eval_number"]) if r["score"] >= best["score"])
        lines.append(f"best found at evaluation {first['eval_number']}")
    util = worker_utilisation(history, summary.get("session"))
    n_session = sum(w["n"] for w in util.values())
    if n_session:
        wall = summary.get("session_s") or 1.0
        lines.append("")
        lines.append(f"this session: {n_session} evaluation(s) in {wall:.1f}s = "
                     f"{60 * n_session / wall:.1f} candidates/min (including start-up)")
        for name, w in sorted(util.items()):
            lines.append(f"  {name}: {w['n']} candidates, scoring {w['eval_s']:.1f}s of {w['span_s']:.1f}s "
                         f"= {100 * w['share']:.1f}% busy; merging {w['build_s']:.1f}s (overlapped)")
    if cfg.search.strategy == "nsga2":
        front = pareto_front(history, cfg.tasks)
        lines += ["", f"Pareto front (NSGA-II, {len(tasks)} objectives): {len(front)} candidate(s): "
                      + ", ".join(r["id"] for r in front[:8]) + (", ..." if len(front) > 8 else ""),
                  f"  recipes: {storage.file('pareto')}/front_NNN.yml; scores: pareto.json; plot: pareto.png"]
    if cfg.evaluation.subsample is not None:
        try:
            with open(storage.file("subsample_agreement.json")) as f:
                lines += ["", agreement_line(json.load(f))]
        except (OSError, ValueError):
            lines += ["", agreement_line({})]
    lines += ["", f"best recipe: {storage.file('best_config.yml')}  (ray-merge "
                  f"{'multi' if cfg.genome.kind == 'both' else 'run'} it unchanged)",
              f"history: {storage.file('history.jsonl')}; plots: progress.png, best_params.png"]
    return "\n".join(lines)


def write_report(storage, genome, cfg, summary: dict) -> str:
    history = storage.read_history()
    inputs = storage.read_inputs()
    if history:
        plot_progress(storage.file("progress.png"), history, inputs, [t.name for t in cfg.tasks])
        ok = [r for r in history if r.get("status") == "ok"]
        if ok:
            best = max(ok, key=lambda r: r["score"])
            plot_best_params(storage.file("best_params.png"), genome, best["genotype"])
        if cfg.search.strategy == "nsga2":
            plot_front(storage.file("pareto.png"), history, cfg.tasks, inputs)
    text = summary_text(storage, genome, cfg, summary)
    storage.write_atomic("summary.txt", text + "\n")
    return text
