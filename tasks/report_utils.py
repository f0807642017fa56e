"""The report a transfer task writes when its run ends: final metrics next to a baseline, and the collapse check.

Caption, VQA and OCR (tasks/caption.py, tasks/vqa.py, tasks/ocr.py) share this one:

* per evaluator of the task's kind, the final value of each reported metric next to the evaluator's
  `baseline/<metric>` (a majority answer / most frequent text);
* the collapse check (`collapse_rows`): every other evaluator's step-0 value (the weights as
  loaded, `eval_at_start=True`) next to its final value;
* the curves of the run (curves.png).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from transfer.metrics import last_values

# Bookkeeping values an evaluator logs next to its metrics: not compared before/after.
_NOT_METRICS = ("seconds", "images", "tokens", "nll_sum")


def collapse_rows(rows: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """Before (step 0) vs after (last) for every metric of the named evaluators that has both."""
    first = next((r for r in rows if r["step"] == 0), {})
    last = last_values(rows)
    out = []
    for key in sorted(first):
        name, _, metric = key.partition("/")
        if name in names and key in last and not metric.endswith(_NOT_METRICS):
            before, after = first[key], last[key]
            out.append(dict(metric=key, before=before, after=after, change=after - before))
    return out


def eval_names(config: Any, kind: str | None = None) -> list[str]:
    """Names of the configured evaluators (of type `kind` only, when given)."""
    evals = dict(config.get("evals") or {})
    return [n for n, e in evals.items() if kind is None or dict(e).get("type") == kind]


def write_report(
    workdir: str,
    config: Any,
    *,
    title: str,
    kind: str,
    metrics: Sequence[str],
    count_key: str,
    files: str,
    filename: str,
) -> str:
    """WORKDIR/<filename> (+ curves.png); returns the markdown.

    `metrics`: the metric names reported for each evaluator of type `kind` (those it logged); `count_key`:
    its metric counting what was scored (e.g. "questions"); `files`: the folder its `write` fills.
    """
    from transfer import metrics as metrics_lib
    from transfer import plots

    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    last = last_values(rows)
    lines = [
        f"# {title}",
        "",
        f"- init (model_init): `{config.get('model_init')}`; not loaded: "
        f"`{list(config.model_load.get('dont_load', []))}`",
        f"- schedule: `{config.schedule}`; lr multipliers: `{list(config.get('lr_mults', []))}`",
        f"- steps: {config.total_steps}, batch {config.input.batch_size}",
        "",
    ]
    for name in eval_names(config, kind):
        table = [
            dict(metric=m, model=last[f"{name}/{m}"], baseline=last.get(f"{name}/baseline/{m}"))
            for m in metrics
            if f"{name}/{m}" in last
        ]
        lines += [f"## `{name}` ({last.get(f'{name}/{count_key}', 0):.0f} {count_key})", ""]
        lines += [plots.markdown_table(table, ["metric", "model", "baseline"]), ""]
        extra = {k: v for k, v in last.items() if k.startswith(f"{name}/baseline_")}
        lines += [f"- `{k}`: {v:.4f}" for k, v in sorted(extra.items())]
        lines += [
            "",
            f"Predictions: `{files}/{name}_step{config.total_steps}.json`; samples: "
            f"[{files}/{name}_samples.html]({files}/{name}_samples.html)",
            "",
        ]
    others = [n for n in eval_names(config) if n not in eval_names(config, kind)]
    collapse = collapse_rows(rows, others)
    lines += ["## Collapse check: the evaluators before (step 0) and after the fine-tune", ""]
    if collapse:
        lines += [plots.markdown_table(collapse, ["metric", "before", "after", "change"]), ""]
    else:
        lines += ["No step-0 values: set `eval_at_start=True` to measure the loaded weights.", ""]
    curves = plots.plot_run(workdir)
    lines += [f"![curves]({os.path.basename(curves)})", ""]
    report = "\n".join(lines)
    with open(os.path.join(workdir, filename), "w") as f:
        f.write(report)
    return report
