"""Plots and tables of a run's metrics.jsonl, so results people read come as a picture or a table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from transfer import metrics


def curve_keys(rows: Sequence[dict]) -> list[str]:
    """The metrics worth a panel: namespaced, not input counters or timings, not a constant series
    (FLOPs per example, image counts: a flat line says nothing), and not a baseline (drawn on its metric's
    panel instead)."""
    keys = sorted(
        {
            k
            for r in rows
            for k in r
            if "/" in k and not k.startswith("input/") and not k.endswith("seconds")
        }
    )
    out = []
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if "/baseline/" in key and _metric_of(key) in keys:
            continue
        if len(values) > 1 and all(v == values[0] for v in values):
            continue
        out.append(key)
    return out


def _metric_of(baseline_key: str) -> str:
    """`caption/baseline/CIDEr` -> `caption/CIDEr` (the panel a baseline is drawn on)."""
    return baseline_key.replace("/baseline/", "/", 1)


def plot_run(workdir: str, keys: Sequence[str] | None = None, out_name: str = "curves.png") -> str:
    """One panel per metric (train and eval curves, an evaluator's baseline dashed on its metric's panel),
    saved as WORKDIR/curves.png; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    keys = curve_keys(rows) if keys is None else list(keys)
    # Drawing is most of a run's plotting time: titles at a fixed height (no search for a free spot above
    # the ticks) and at most 5 ticks per axis make it about a third faster, with the same picture.
    with matplotlib.rc_context({"axes.titley": 1.0}):
        fig, axes = _draw(rows, keys, plt)
        path = os.path.join(workdir, out_name)
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw(rows: Sequence[dict], keys: Sequence[str], plt: Any) -> tuple[Any, Any]:
    from matplotlib import ticker

    baselines = {_metric_of(k): k for r in rows for k in r if "/baseline/" in k}
    cols = min(4, max(len(keys), 1))
    rows_n = max(-(-len(keys) // cols), 1)  # one empty panel when nothing was logged (0 steps)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    if not keys:
        axes.flat[0].text(0.5, 0.5, "no metric logged", ha="center", va="center")
    for ax, key in zip(axes.flat, keys, strict=False):
        for name, style in ((key, "-"), (baselines.get(key), "--")):
            points = [(r["step"], r[name]) for r in rows if name and name in r]
            if points:
                xs, ys = zip(*points, strict=True)
                label = "baseline" if name != key else None
                ax.plot(xs, ys, style, marker="o" if len(points) < 20 else None, label=label)
        if key in baselines:
            ax.legend(fontsize="small")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4, integer=True))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(4))
    # Fixed margins: tight_layout measures every text box and costs as much as drawing the figure.
    fig.subplots_adjust(
        left=0.06, right=0.98, bottom=0.3 / rows_n, top=1 - 0.25 / rows_n, hspace=0.55, wspace=0.3
    )
    return fig, axes


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
