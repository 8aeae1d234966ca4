"""The search's report: progress.png, best_params.png and a one-screen summary.txt (matplotlib, Agg)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np


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


def plot_progress(path: str, history: list[dict], inputs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = sorted(history, key=lambda r: r.get("eval_number", 0))
    xs, ys, fx, best, bx = [], [], [], [], []
    cur = -np.inf
    for i, r in enumerate(hist, 1):
        if r.get("status") == "ok":
            xs.append(i)
            ys.append(r["score"])
            cur = max(cur, r["score"])
        else:
            fx.append(i)
        if np.isfinite(cur):
            bx.append(i)
            best.append(cur)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.scatter(xs, ys, s=14, alpha=0.6, label="candidate", color="tab:blue")
    ax.step(bx, best, where="post", color="tab:red", lw=2, label="best so far")
    if fx:
        lo = min(ys) if ys else 0.0
        ax.scatter(fx, [lo] * len(fx), marker="x", color="black", label="failed")
    colors = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray", "tab:olive"]
    for j, r in enumerate(r for r in inputs if r.get("status") == "ok"):
        ax.axhline(r["score"], ls="--", lw=1, color=colors[j % len(colors)],
                   label=f"input {r['id'].split(':', 1)[-1]}")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("combined score")
    ax.set_title("evolutionary merge search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_best_params(path: str, genome, genotype) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, table = genome.layer_table(genotype)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 + 0.55 * table.shape[1]), max(2.5, 0.9 + 0.45 * len(labels))),
                           dpi=110)
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(table.shape[1]), [str(i) for i in range(table.shape[1])], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title("best recipe's parameters by layer")
    if table.size <= 400:
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < (table.min() + table.max()) / 2 else "black")
    fig.colorbar(im, ax=ax)
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
    lines += ["", f"best recipe: {storage.file('best_config.yml')}  (ray-merge run it unchanged)",
              f"history: {storage.file('history.jsonl')}; plots: progress.png, best_params.png"]
    return "\n".join(lines)


def write_report(storage, genome, cfg, summary: dict) -> str:
    history = storage.read_history()
    inputs = storage.read_inputs()
    if history:
        plot_progress(storage.file("progress.png"), history, inputs)
        ok = [r for r in history if r.get("status") == "ok"]
        if ok:
            best = max(ok, key=lambda r: r["score"])
            plot_best_params(storage.file("best_params.png"), genome, best["genotype"])
    text = summary_text(storage, genome, cfg, summary)
    storage.write_atomic("summary.txt", text + "\n")
    return text
