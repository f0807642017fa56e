"""Caption fine-tunes: ``config.task = "tasks.caption"`` (configs/caption_coco.py).

The model and loss are CapPa's captioning branch (pretrain/cappa_task.py with ``masked_pred_prob=0``):
teacher-forced next-token cross-entropy of one reference caption per image, drawn at random per example
and step by the pp's ``choice`` op when an image has several. What the config chooses:

* the vision tower frozen (``schedule`` rule ``("img/.*", None)``: no gradient, no optimizer state),
  fine-tuned, or fine-tuned with an lr multiplier (``lr_mults``);
* the decoder loaded from the CapPa run in ``model_init``, or trained from scratch on the frozen tower
  (``model_load.dont_load=["txt/.*"]``: the paper's "LiT-decoder" protocol).

Evaluation: the ``caption`` evaluator (tasks/caption_eval.py: decode, COCO metrics, predictions JSON,
samples page) plus every CapPa evaluator (perplexity, caption-scoring zero-shot, pairwise). With
``eval_at_start=True`` every evaluator also runs on the loaded weights, and ``finalize`` writes
``caption.md``: the final caption metrics against the constant-caption baseline, and the collapse check:
each evaluator's step-0 value (the CapPa tower and decoder as loaded) next to its final value.
"""

from __future__ import annotations

import os
from typing import Any

from pretrain import cappa_task
from tasks import caption_eval

DEFAULTS = dict(cappa_task.DEFAULTS, masked_pred_prob=0.0)
_REPORTED = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "BLEU-1")
_NOT_METRICS = ("seconds", "images", "tokens", "nll_sum")


class Task(cappa_task.Task):
    """CapPa's task with captioning as the default branch, the caption evaluator and a report."""

    def evaluators(self) -> dict[str, type]:
        return {**super().evaluators(), **caption_eval.EVALUATORS}

    def finalize(self, workdir: str) -> None:
        write_report(workdir, self.config)


def _eval_names(config: Any, kind: str | None = None) -> list[str]:
    evals = dict(config.get("evals") or {})
    return [n for n, e in evals.items() if kind is None or dict(e).get("type") == kind]


def _first_and_last(rows: list[dict]) -> tuple[dict, dict]:
    """The step-0 row's values and, per key, the last value of the run (steps > 0)."""
    first = next((r for r in rows if r["step"] == 0), {})
    last: dict[str, Any] = {}
    for row in rows:
        if row["step"] > 0:
            last.update({k: v for k, v in row.items() if k != "step"})
    return first, last


def collapse_rows(rows: list[dict], names: list[str]) -> list[dict]:
    """Before (step 0) vs after (last) for every metric of the named evaluators that has both."""
    first, last = _first_and_last(rows)
    out = []
    for key in sorted(first):
        name, _, metric = key.partition("/")
        if name in names and key in last and not metric.endswith(_NOT_METRICS):
            before, after = first[key], last[key]
            out.append(dict(metric=key, before=before, after=after, change=after - before))
    return out


def write_report(workdir: str, config: Any) -> str:
    """WORKDIR/caption.md (+ curves.png); returns the markdown."""
    from transfer import metrics, plots

    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    _, last = _first_and_last(rows)
    lines = [
        "# Caption fine-tune",
        "",
        f"- init (model_init): `{config.get('model_init')}`; not loaded: "
        f"`{list(config.model_load.get('dont_load', []))}`",
        f"- schedule: `{config.schedule}`; lr multipliers: `{list(config.get('lr_mults', []))}`",
        f"- steps: {config.total_steps}, batch {config.input.batch_size}",
        "",
    ]
    for name in _eval_names(config, "caption"):
        table = []
        for metric in _REPORTED:
            if f"{name}/{metric}" in last:
                base = last.get(f"{name}/baseline/{metric}")
                table.append(dict(metric=metric, model=last[f"{name}/{metric}"], constant=base))
        lines += [f"## `{name}` ({last.get(f'{name}/images', 0):.0f} images)", ""]
        lines += [plots.markdown_table(table, ["metric", "model", "constant"]), ""]
        lines += [
            f"Predictions: `captions/{name}_step{config.total_steps}.json`; samples: "
            f"[captions/{name}_samples.html](captions/{name}_samples.html)",
            "",
        ]
    others = [n for n in _eval_names(config) if n not in _eval_names(config, "caption")]
    collapse = collapse_rows(rows, others)
    lines += ["## Collapse check: the evaluators before (step 0) and after the fine-tune", ""]
    if collapse:
        lines += [plots.markdown_table(collapse, ["metric", "before", "after", "change"]), ""]
    else:
        lines += ["No step-0 values: set `eval_at_start=True` to measure the loaded weights.", ""]
    curves = plots.plot_run(workdir)
    lines += [f"![curves]({os.path.basename(curves)})", ""]
    report = "\n".join(lines)
    with open(os.path.join(workdir, "caption.md"), "w") as f:
        f.write(report)
    return report
