"""The demo's report: WORKDIR/summary.json (every final metric of every stage), report.md and report.html.

The results table puts every transfer's number from the CapPa-pretrained tower next to the same transfer, same
budget, from the random-init tower of the same shape, from the supervised reference tower (where it applies)
and next to its trivial baseline (chance, the constant caption, the majority answer). Few-shot cells are mean +-
sample std over seeds; a row is won when the pretrained tower's gap to the random one exceeds the spread
(sqrt(std_a^2 + std_b^2); 0 for single runs). The rest is figures this run drew: training curves, caption / VQA
/ OCR samples, register attention maps. Numbers in report.md are formatted from summary.json, never typed in.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping
from typing import Any

REPORT_FILES = ("summary.json", "report.md", "report.html")
HEADLINE_SHOTS = ("10", "25")
TOWERS = {"pretrain": "CapPa", "random_tower": "random init", "supervised": "supervised"}
COLUMNS = ["transfer", "metric", *TOWERS, "baseline", "baseline_is", "verdict"]
_COUNTS = (
    "seconds",
    "nll_sum",
    "tokens",
    "images",
    "classes",
)  # bookkeeping, not before/after metrics
# Transfers the CapPa tower does not win at this scale, and why (one sentence each; shown only when not won).
WHY_NOT = {
    "few-shot linear probe, digits": "digits (8x8 handwriting upsampled 8x) is outside the pretraining images; "
    "raw pixels alone reach ~89 % (docs/demo_sweep.md), and a random projection keeps more of that pixel detail "
    "than a tower trained for minutes to name coloured shapes.",
    "few-shot linear probe, scenes_shape": "the main object's shape, rotated freely among distractors of other "
    "shapes, is the factor a tiny captioner learns last (every recipe of docs/demo_sweep.md stays within a few "
    "points of the random tower at 10 shots; chance is 16.7 %).",
    "OCR (frozen tower), embedded": "neither init learns to read in the demo's 200 steps (exact match 0 for both; "
    "configs/ocr.py trains 1,500), so these rows compare two decoders that cannot read yet.",
}


def _row(
    transfer: str,
    metric: str,
    values: Mapping[str, Any],
    baseline: Any,
    baseline_is: str,
    lower_is_better: bool = False,
) -> dict:
    """`values`: {tower: value or (mean, std)}."""
    row: dict[str, Any] = dict(
        transfer=transfer,
        metric=metric,
        baseline=baseline,
        baseline_is=baseline_is,
        lower_is_better=lower_is_better,
    )
    for tower in TOWERS:
        value = values.get(tower)
        mean, std = value if isinstance(value, tuple) else (value, None)
        row[tower], row[f"{tower}_std"] = mean, std
    row["verdict"] = verdict(row)
    return row


def verdict(row: Mapping[str, Any]) -> str | None:
    """'won' / 'lost' when the CapPa tower's gap to the random one exceeds the spread, else 'within spread'."""
    pre, rnd = row["pretrain"], row["random_tower"]
    if pre is None or rnd is None:
        return None
    gap = (rnd - pre) if row["lower_is_better"] else (pre - rnd)
    spread = math.hypot(row["pretrain_std"] or 0.0, row["random_tower_std"] or 0.0)
    if gap > spread:
        return "won"
    return "lost" if -gap > spread else "within spread"


def _final(results: Mapping, stage: str, tower: str = "pretrain") -> dict:
    return dict(results.get(stage, {}).get(tower, {}).get("final", {}))


def _per_tower(results: Mapping, stage: str, key: str) -> dict[str, Any]:
    return {t: _final(results, stage, t).get(key) for t in TOWERS if t in results.get(stage, {})}


def headline_rows(results: Mapping[str, Any]) -> list[dict]:
    """The results table: one row per (transfer, metric), each tower's value and the trivial baseline."""
    rows = []
    fewshot = results.get("fewshot", {})
    for dataset, shots in fewshot.get("pretrain", {}).items():
        largest = str(max(int(s) for s in shots))
        for k in shots:
            if k not in HEADLINE_SHOTS and k != largest:
                continue  # the other shot counts are in fewshot/*/fewshot.md
            values = {}
            for tower in TOWERS:
                cell = fewshot.get(tower, {}).get(dataset, {}).get(k)
                values[tower] = (cell["mean"], cell["std"]) if cell else None
            rows.append(
                _row(f"few-shot linear probe, {dataset}", f"{k}-shot top-1", values, None, "-")
            )
    if "map_probe" in results:
        rows.append(
            _row(
                "MAP probe (trained, wd sweep), scenes",
                "test top-1",
                _per_tower(results, "map_probe", "probe/prec@1"),
                None,
                "-",
            )
        )
    if "siglit" in results:
        classes = _final(results, "siglit").get("zeroshot/classes")
        rows.append(
            _row(
                "SigLiT (frozen tower), scenes",
                "zero-shot top-1",
                _per_tower(results, "siglit", "zeroshot/prec@1"),
                1.0 / classes if classes else None,
                "chance",
            )
        )
        for key in ("i2t_recall@1", "t2i_recall@1"):
            n = _final(results, "siglit").get(
                "retrieval/images" if key.startswith("t2i") else "retrieval/texts"
            )
            rows.append(
                _row(
                    "SigLiT retrieval, scenes val",
                    key,
                    _per_tower(results, "siglit", f"retrieval/{key}"),
                    None if not n else 1.0 / n,
                    "chance (1 / candidates)",
                )
            )
    caption = _final(results, "caption")
    for metric in ("CIDEr", "BLEU-4", "METEOR"):
        if f"caption/{metric}" in caption:
            rows.append(
                _row(
                    "caption fine-tune (frozen tower), scenes val",
                    metric,
                    _per_tower(results, "caption", f"caption/{metric}"),
                    caption.get(f"caption/baseline/{metric}"),
                    "constant caption",
                )
            )
    answers = (("vqa", ("vqa/accuracy",)), ("ocr", ("ocr/exact_match", "ocr/cer", "ocr/anls")))
    for stage, keys in answers:
        final = _final(results, stage)
        for key in keys:
            if key in final:
                name = key.split("/", 1)[1]
                what = "VQA accuracy (%)" if stage == "vqa" else name
                base = "majority answer" if stage == "vqa" else "most frequent training text"
                rows.append(
                    _row(
                        f"{stage.upper()} (frozen tower), embedded",
                        what,
                        _per_tower(results, stage, key),
                        final.get(key.replace("/", "/baseline/", 1)),
                        base,
                        lower_is_better=key == "ocr/cer",
                    )
                )
    return rows


def tower_verdict(rows: list[dict]) -> dict:
    """How many rows the pretrained tower wins against the random-init one by more than the spread."""
    compared = [r for r in rows if r["verdict"] is not None]
    not_won = [r for r in compared if r["verdict"] != "won"]
    return {
        "rows": len(compared),
        "won": len(compared) - len(not_won),
        "not_won": [f"{r['transfer']}: {r['metric']} ({r['verdict']})" for r in not_won],
        "why": {r["transfer"]: WHY_NOT[r["transfer"]] for r in not_won if r["transfer"] in WHY_NOT},
    }


def collapse_rows(results: Mapping[str, Any]) -> list[dict]:
    """The caption fine-tune's before (step 0, the CapPa weights) and after values of the other evaluators."""
    run = results.get("caption", {}).get("pretrain", {})
    start, final = run.get("start", {}), run.get("final", {})
    rows = []
    for key in sorted(start):
        name = key.split("/", 1)[0]
        metric = key.split("/", 1)[-1]
        if name in ("fewshot", "zeroshot", "val") and key in final and metric not in _COUNTS:
            rows.append(dict(metric=key, before=start[key], after=final[key]))
    return rows


def pretrain_rows(results: Mapping[str, Any]) -> list[dict]:
    final = dict(results.get("pretrain", {}).get("final", {}))
    keys = ("train/loss", "val/perplexity", "zeroshot/prec@1", "colour_swap/accuracy")
    rows = [dict(metric=k, value=final[k]) for k in keys if k in final]
    supervised = dict(results.get("supervised", {}).get("final", {}))
    if "val/prec@1" in supervised:
        rows.append(dict(metric="supervised tower: val/prec@1", value=supervised["val/prec@1"]))
    return rows


def summary(results: Mapping[str, Any], minutes: float) -> dict:
    """Every final metric of every stage, plus the tables above (what report.md formats)."""
    out: dict[str, Any] = {"minutes": round(minutes, 2), "stages": {}}
    for stage, result in results.items():
        entry: dict[str, Any] = {"seconds": result.get("seconds")}
        for key, value in result.items():
            if key in ("final", "start") or stage == "fewshot":
                entry[key] = value
            elif key in TOWERS and isinstance(value, Mapping):
                entry[key] = {p: value[p] for p in ("final", "start") if p in value}
        out["stages"][stage] = entry
    out["headline"] = headline_rows(results)
    out["tower_vs_random"] = tower_verdict(out["headline"])
    out["collapse"] = collapse_rows(results)
    out["pretrain"] = pretrain_rows(results)
    return out


def fmt(value: Any, std: Any = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" + ("" if std is None else f" ± {std:.4f}")
    return str(value)


def cell(row: Mapping[str, Any], column: str) -> str:
    """A table cell: a tower's value with its seed spread, or any other field."""
    return fmt(row.get(column), row.get(f"{column}_std") if column in TOWERS else None)


def table(rows: list[dict], columns: list[str]) -> str:
    names = [TOWERS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _figures(workdir: str) -> list[tuple[str, str]]:
    """(title, path relative to workdir) of the PNGs the stages wrote, in reading order."""
    from transfer import plots

    figures = []
    runs = [("pretrain", "pretrain/run"), ("supervised", "supervised/run")]
    runs += [
        (f"{s} ({TOWERS[t]})", f"{s}/{t}/run")
        for s in ("siglit", "caption", "vqa", "ocr")
        for t in TOWERS
    ]
    for title, run in runs:
        if os.path.isfile(os.path.join(workdir, run, "metrics.jsonl")):
            if not os.path.isfile(os.path.join(workdir, run, "curves.png")):  # tasks that draw none
                plots.plot_run(os.path.join(workdir, run))
            figures.append((f"{title}: training curves", os.path.join(run, "curves.png")))
    for tower in TOWERS:
        path = os.path.join("fewshot", tower, "fewshot.png")
        if os.path.isfile(os.path.join(workdir, path)):
            figures.append((f"few-shot accuracy vs shots ({tower})", path))
    attention = os.path.join(workdir, "attention")
    if os.path.isdir(attention):
        for name in sorted(os.listdir(attention)):
            if name.endswith("_attention.png"):
                figures.append((f"attention maps: {name}", os.path.join("attention", name)))
    return figures


SAMPLE_PAGES = (  # (title, page written by the stage's evaluator)
    (
        "Caption samples: generated caption (bold) and references",
        "caption/pretrain/run/captions/caption_samples.html",
    ),
    (
        "VQA samples: question, generated answer, the ten human answers",
        "vqa/pretrain/run/vqa/vqa_samples.html",
    ),
    ("OCR samples: generated text and the reference", "ocr/pretrain/run/ocr/ocr_samples.html"),
)


def sample_pages(workdir: str) -> list[tuple[str, str]]:
    return [(t, p) for t, p in SAMPLE_PAGES if os.path.isfile(os.path.join(workdir, p))]


def markdown(
    data: Mapping[str, Any], figures: list[tuple[str, str]], samples: list[tuple[str, str]]
) -> str:
    lines = [
        "# cappa-transfer demo report",
        "",
        f"Everything below was produced by this run ({data['minutes']:.1f} min). {COMPARISON}",
        "",
        "## Every transfer: CapPa tower vs random-init tower",
        "",
        table(data["headline"], COLUMNS),
        "",
        verdict_text(data["tower_vs_random"]),
        "",
        "## Pretraining (tiny CapPa)",
        "",
        table(data["pretrain"], ["metric", "value"]),
        "",
        "## Collapse check: the caption fine-tune, before (CapPa weights) and after",
        "",
        table(data["collapse"], ["metric", "before", "after"]),
        "",
        "## Samples",
        "",
        *[f"- [{title}]({path})" for title, path in samples],
        "",
        "## Figures",
        "",
    ]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines)


COMPARISON = (
    "Each transfer runs with the same recipe and budget from two towers of one shape: CapPa-pretrained and "
    "random init (never trained). The probes also read a supervised tower (trained on the scenes label: an upper "
    "reference, taught the very classes the probes ask for). Few-shot "
    "cells: mean ± std over 3 seeds. A row is won when the CapPa tower's gap to the random one exceeds the "
    "spread, sqrt(std_CapPa² + std_random²) (0 for single runs). The baseline column is the trivial one: "
    "chance, the constant caption, the majority answer."
)


def verdict_text(verdict: Mapping[str, Any]) -> str:
    text = (
        f"The CapPa tower beats the random-init tower by more than the spread on {verdict['won']} of the "
        f"{verdict['rows']} rows above."
    )
    if verdict["not_won"]:
        text += " Not on: " + "; ".join(verdict["not_won"]) + "."
    for transfer, why in verdict.get("why", {}).items():
        text += f" Why not {transfer}: {why}"
    return text


def _inline(workdir: str, path: str) -> str:
    with open(os.path.join(workdir, path), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def html_page(workdir: str, data: Mapping[str, Any], figures: list[tuple[str, str]]) -> str:
    """report.md's content as one self-contained page (figures inlined), plus the sample pages."""

    def html_table(rows: list[dict], columns: list[str]) -> str:
        head = "".join(f"<th>{html.escape(TOWERS.get(c, c))}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell(r, c))}</td>" for c in columns) + "</tr>"
            for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cappa-transfer demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px} img{max-width:100%}</style></head><body>",
        "<h1>cappa-transfer demo report</h1>",
        f"<p>Everything below was produced by this run ({data['minutes']:.1f} min). "
        f"{html.escape(COMPARISON)}</p>",
        "<h2>Every transfer: CapPa tower vs random-init tower</h2>",
        html_table(data["headline"], COLUMNS),
        f"<p>{html.escape(verdict_text(data['tower_vs_random']))}</p>",
        "<h2>Pretraining (tiny CapPa)</h2>",
        html_table(data["pretrain"], ["metric", "value"]),
        "<h2>Collapse check: caption fine-tune before / after</h2>",
        html_table(data["collapse"], ["metric", "before", "after"]),
    ]
    for title, path in sample_pages(workdir):
        with open(os.path.join(workdir, path), encoding="utf-8") as f:
            body = f.read().split("<body>", 1)[-1].rsplit("</body>", 1)[0]
        parts += [
            f"<h2>{html.escape(title)}</h2>",
            body.replace("<h1>", "<h3>").replace("</h1>", "</h3>"),
        ]
    parts.append("<h2>Figures</h2>")
    for title, path in figures:
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{_inline(workdir, path)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(workdir: str, results: Mapping[str, Any], minutes: float) -> list[str]:
    """Writes summary.json, report.md and report.html into `workdir`; returns their paths."""
    data = summary(results, minutes)
    figures = _figures(workdir)
    paths = [os.path.join(workdir, name) for name in REPORT_FILES]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(data, figures, sample_pages(workdir)))
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(html_page(workdir, data, figures))
    return paths
