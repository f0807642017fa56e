"""Plots and tables of a run's metrics.jsonl, so results people read come as a picture or a table."""

from __future__ import annotations

import os
from collections.abc import Sequence

from transfer import metrics


def plot_run(workdir: str, keys: Sequence[str] | None = None, out_name: str = "curves.png") -> str:
    """One panel per metric (train and eval curves), saved as WORKDIR/curves.png; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if keys is None:
        keys = sorted(
            {
                k
                for r in rows
                for k in r
                if "/" in k and not k.startswith("input/") and not k.endswith("seconds")
            }
        )
    cols = min(4, max(len(keys), 1))
    rows_n = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 20 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, out_name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
