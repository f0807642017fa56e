"""The demo's report: WORKDIR/summary.json (every final metric of every stage), report.md and report.html.

The results table puts each transfer's headline number next to its trivial baseline (the random-init tower,
the constant caption, the majority answer, chance); the rest of the report is figures this run drew:
training curves, caption / VQA / OCR samples, register attention maps. Numbers in report.md are formatted from
summary.json, never typed in.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping
from typing import Any

REPORT_FILES = ("summary.json", "report.md", "report.html")
HEADLINE_SHOTS = ("10", "25")
_COUNTS = (
    "seconds",
    "nll_sum",
    "tokens",
    "images",
    "classes",
)  # bookkeeping, not before/after metrics


def _row(transfer: str, metric: str, model: Any, baseline: Any, baseline_is: str) -> dict:
    return dict(
        transfer=transfer, metric=metric, model=model, baseline=baseline, baseline_is=baseline_is
    )


def _final(results: Mapping, stage: str) -> dict:
    return dict(results.get(stage, {}).get("final", {}))


def headline_rows(results: Mapping[str, Any]) -> list[dict]:
    """The results table: one row per (transfer, metric), the model's value and its baseline's."""
    rows = []
    fewshot = results.get("fewshot", {})
    pre, rnd = fewshot.get("pretrain", {}), fewshot.get("random_tower", {})
    for dataset, shots in pre.items():
        for k, value in shots.items():
            if k not in HEADLINE_SHOTS and str(max(int(s) for s in shots)) != k:
                continue  # the other shot counts are in fewshot/*/fewshot.md
            base = rnd.get(dataset, {}).get(k)
            rows.append(
                _row(
                    f"few-shot linear probe, {dataset}",
                    f"{k}-shot top-1",
                    value,
                    base,
                    "random-init tower",
                )
            )
    probes = results.get("map_probe", {})
    if probes:
        pre_p = probes.get("pretrain", {}).get("final", {})
        rnd_p = probes.get("random_tower", {}).get("final", {})
        rows.append(_row("MAP probe (trained, wd sweep), scenes", "test top-1", pre_p.get("probe/prec@1"),
                         rnd_p.get("probe/prec@1"), "random-init tower"))  # fmt: skip
    siglit = _final(results, "siglit")
    if siglit:
        classes = siglit.get("zeroshot/classes")
        chance = 1.0 / classes if classes else None
        rows.append(_row("SigLiT (frozen tower), scenes", "zero-shot top-1", siglit.get("zeroshot/prec@1"),
                         chance, "chance"))  # fmt: skip
        for key in ("i2t_recall@1", "t2i_recall@1"):
            n = (
                siglit.get("retrieval/images")
                if key.startswith("t2i")
                else siglit.get("retrieval/texts")
            )
            rows.append(_row("SigLiT retrieval, scenes val", key, siglit.get(f"retrieval/{key}"),
                             None if not n else 1.0 / n, "chance (1 / candidates)"))  # fmt: skip
    caption = _final(results, "caption")
    for metric in ("CIDEr", "BLEU-4", "METEOR"):
        if f"caption/{metric}" in caption:
            rows.append(_row("caption fine-tune (frozen tower), scenes val", metric, caption[f"caption/{metric}"],
                             caption.get(f"caption/baseline/{metric}"), "constant caption"))  # fmt: skip
    answers = (("vqa", ("vqa/accuracy",)), ("ocr", ("ocr/exact_match", "ocr/cer", "ocr/anls")))
    for stage, keys in answers:
        final = _final(results, stage)
        for key in keys:
            if key in final:
                name = key.split("/", 1)[1]
                what = "VQA accuracy (%)" if stage == "vqa" else name
                base = "majority answer" if stage == "vqa" else "most frequent training text"
                rows.append(_row(f"{stage.upper()} (frozen tower), embedded", what, final[key],
                                 final.get(key.replace("/", "/baseline/", 1)), base))  # fmt: skip
    return rows


def tower_verdict(rows: list[dict]) -> dict:
    """How often the pretrained tower beats the random-init one, over the rows that compare the two."""
    pairs = [
        r
        for r in rows
        if r["baseline_is"] == "random-init tower" and None not in (r["model"], r["baseline"])
    ]
    wins = [r for r in pairs if r["model"] > r["baseline"]]
    return {"rows": len(pairs), "pretrained_better": len(wins),
            "worse": [f"{r['transfer']}: {r['metric']}" for r in pairs if r["model"] <= r["baseline"]]}  # fmt: skip


def collapse_rows(results: Mapping[str, Any]) -> list[dict]:
    """The caption fine-tune's before (step 0, the CapPa weights) and after values of the other evaluators."""
    run = results.get("caption", {})
    start, final = run.get("start", {}), run.get("final", {})
    rows = []
    for key in sorted(start):
        name = key.split("/", 1)[0]
        metric = key.split("/", 1)[-1]
        if name in ("fewshot", "zeroshot", "val") and key in final and metric not in _COUNTS:
            rows.append(dict(metric=key, before=start[key], after=final[key]))
    return rows


def pretrain_rows(results: Mapping[str, Any]) -> list[dict]:
    final = _final(results, "pretrain")
    keys = ("train/loss", "val/perplexity", "zeroshot/prec@1", "colour_swap/accuracy")
    return [dict(metric=k, value=final[k]) for k in keys if k in final]


def summary(results: Mapping[str, Any], minutes: float) -> dict:
    """Every final metric of every stage, plus the tables above (what report.md formats)."""
    out: dict[str, Any] = {"minutes": round(minutes, 2), "stages": {}}
    for stage, result in results.items():
        entry = {"seconds": result.get("seconds")}
        for part in ("final", "start"):
            if part in result:
                entry[part] = result[part]
        if stage in ("fewshot",):
            entry.update({k: v for k, v in result.items() if k != "seconds"})
        if stage == "map_probe":
            entry.update(
                {t: result[t].get("final", {}) for t in ("pretrain", "random_tower") if t in result}
            )
        out["stages"][stage] = entry
    out["headline"] = headline_rows(results)
    out["tower_vs_random"] = tower_verdict(out["headline"])
    out["collapse"] = collapse_rows(results)
    out["pretrain"] = pretrain_rows(results)
    return out


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _figures(workdir: str) -> list[tuple[str, str]]:
    """(title, path relative to workdir) of the PNGs the stages wrote, in reading order."""
    from transfer import plots

    figures = []
    for stage in ("pretrain", "siglit", "caption", "vqa", "ocr"):
        run = os.path.join(workdir, stage, "run")
        if os.path.isfile(os.path.join(run, "metrics.jsonl")):
            plots.plot_run(run)
            figures.append((f"{stage}: training curves", os.path.join(stage, "run", "curves.png")))
    for tower in ("pretrain", "random_tower"):
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
        "caption/run/captions/caption_samples.html",
    ),
    (
        "VQA samples: question, generated answer, the ten human answers",
        "vqa/run/vqa/vqa_samples.html",
    ),
    ("OCR samples: generated text and the reference", "ocr/run/ocr/ocr_samples.html"),
)


def sample_pages(workdir: str) -> list[tuple[str, str]]:
    return [(t, p) for t, p in SAMPLE_PAGES if os.path.isfile(os.path.join(workdir, p))]


def markdown(
    data: Mapping[str, Any], figures: list[tuple[str, str]], samples: list[tuple[str, str]]
) -> str:
    lines = [
        "# cappa-transfer demo report",
        "",
        f"Everything below was produced by this run ({data['minutes']:.1f} min). Baselines: the random-init tower "
        "(same architecture, never trained), the most frequent training caption / answer, chance.",
        "",
        "## Results against trivial baselines",
        "",
        table(data["headline"], ["transfer", "metric", "model", "baseline", "baseline_is"]),
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


def verdict_text(verdict: Mapping[str, Any]) -> str:
    text = (
        f"The pretrained tower beats the random-init tower on {verdict['pretrained_better']} of the "
        f"{verdict['rows']} probe rows above."
    )
    if verdict["worse"]:
        text += " Not on: " + "; ".join(verdict["worse"]) + "."
    return text


def _inline(workdir: str, path: str) -> str:
    with open(os.path.join(workdir, path), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def html_page(workdir: str, data: Mapping[str, Any], figures: list[tuple[str, str]]) -> str:
    """report.md's content as one self-contained page (figures inlined), plus the sample pages."""

    def html_table(rows: list[dict], columns: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
            for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cappa-transfer demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px} img{max-width:100%}</style></head><body>",
        "<h1>cappa-transfer demo report</h1>",
        f"<p>Everything below was produced by this run ({data['minutes']:.1f} min).</p>",
        "<h2>Results against trivial baselines</h2>",
        html_table(data["headline"], ["transfer", "metric", "model", "baseline", "baseline_is"]),
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
