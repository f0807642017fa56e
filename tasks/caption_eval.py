"""The `caption` evaluator: decode an eval split with the task's captioner and score it with the COCO metrics.

    evals.test = dict(type="caption", data=dict(name="coco_captions", split="val"),
                      pp="decode|resize(224)|value_range(-1, 1)", method="beam", beam_size=4)

Any task with a CapPa `model` (`model.txt_kw`, `Model.encode` + decoder) and a tokenizer can use it: the
caption fine-tune (tasks/caption.py) and CapPa pretraining itself. `pp` preprocesses the image only; the
references are read once, at start-up, from `caption_key` of every example (so a wrong key fails before
training), keyed by `id_key` (one id per image, as COCO's `image/id`).

Decoding, the baseline's bookkeeping and the files are tasks/generation_eval.py's. Metrics are
tasks/caption_metrics.py's (PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when its jars are
present): with `constant_baseline=True` the same metrics of the most frequent training caption predicted
for every image are reported as `baseline/<metric>` (computed once; the references do not change).

After each run the loop calls `write(workdir, step, name)`: `captions/<name>_step<N>.json` (COCO results
format: `[{"image_id", "caption"}]`) and `captions/<name>_samples.html` (the first `num_samples` images
with the generated and reference captions).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from tasks import caption_metrics, generation_eval
from transfer import contracts, input_pipeline

DEFAULTS = dict(
    type="caption",
    data=None,  # merged over config.input.data; set at least `split`
    pp=None,  # image preprocessing, e.g. "decode|resize(224)|value_range(-1, 1)"
    batch_size=None,  # None = config.input.batch_size
    log_steps=None,
    caption_key="captions/text",  # the reference captions (a sequence of strings per image)
    id_key="image/id",
    max_refs=5,  # references kept per image (COCO has 5, a few images 6-7)
    method="greedy",  # "greedy" | "beam" | "sample" (pretrain/decode.py)
    beam_size=4,
    length_penalty=0.0,
    max_len=None,  # None = the decoder's max_len
    metrics=caption_metrics.METRICS,
    tokenizer=None,  # None = config.tokenizer
    num_samples=16,  # images on the samples page
    constant_baseline=False,  # also score the most frequent training caption for every image
    seed=0,  # for method="sample"
)


def require_captioner(task: Any, where: str) -> None:
    model = getattr(task, "model", None)
    if model is None or not hasattr(model, "txt_kw"):
        raise ValueError(f"the caption evaluator needs a CapPa captioner task; {where} has none.")


def read_references(data: Mapping[str, Any], caption_key: str, id_key: str, max_refs: int) -> dict:
    """{image id: [reference captions]} of a whole split, read on this host without decoding images."""
    texts = (
        f"transfer.evaluators.first_texts(key={caption_key!r}, n={int(max_refs)}, outkey='refs')"
    )
    pp = f"flatten|{texts}|keep({id_key!r}, 'refs')"
    refs: dict[int, list[str]] = {}
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for image_id, texts, real in zip(batch[id_key], batch["refs"], batch["_mask"], strict=True):
            if not real:
                continue
            image_id = int(image_id)
            if image_id in refs:
                raise ValueError(
                    f"caption evaluator: id {image_id} occurs twice in {dict(data)}; `id_key` "
                    f"({id_key!r}) must identify images (one example per image)."
                )
            refs[image_id] = [t.decode("utf-8").strip() for t in texts if t.strip()]
    empty = [i for i, r in refs.items() if not r]
    if not refs or len(empty) == len(refs):
        raise ValueError(
            f"caption evaluator: no references under {caption_key!r} in {dict(data)}; check caption_key."
        )
    if empty:
        raise ValueError(
            f"caption evaluator: {len(empty)} image(s) without a reference caption (e.g. id {empty[0]})."
        )
    return refs


def most_frequent_caption(data: Mapping[str, Any], caption_key: str) -> str:
    """The constant-caption baseline: the training split's most frequent caption (ties: the first seen)."""
    pp = f"flatten|transfer.evaluators.first_texts(key={caption_key!r}, n=8, outkey='refs')|keep('refs')"
    counts: collections.Counter = collections.Counter()
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for texts, real in zip(batch["refs"], batch["_mask"], strict=True):
            if real:
                counts.update(t.decode("utf-8").strip() for t in texts if t.strip())
    if not counts:
        raise ValueError(f"constant baseline: no captions under {caption_key!r} in {dict(data)}.")
    return counts.most_common(1)[0][0]


class CaptionEvaluator(generation_eval.GenerationEvaluator):
    """COCO metrics of captions decoded from one pass over the eval split (see the module docstring)."""

    KIND, FOLDER, DEFAULTS = "caption", "captions", DEFAULTS
    METHODS = ("greedy", "beam", "sample")

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        self.constant = None
        if self.cfg["constant_baseline"]:
            self.constant = most_frequent_caption(ctx.config.input.data, self.cfg["caption_key"])

    def check_task(self, task: Any, config: Any) -> None:
        require_captioner(task, f"task {config.task!r}")
        unknown = [m for m in self.cfg["metrics"] if m not in caption_metrics.METRICS]
        if unknown:
            raise ValueError(
                f"caption evaluator: unknown metrics {unknown}; use {caption_metrics.METRICS}."
            )

    def references(self, data: Mapping[str, Any], config: Any) -> dict:
        cfg = self.cfg
        return read_references(data, cfg["caption_key"], cfg["id_key"], cfg["max_refs"])

    def score(self, preds: Mapping[int, str]) -> tuple[dict[str, float], dict[str, Any]]:
        refs = {i: self.refs[i] for i in preds}
        result = caption_metrics.score(refs, preds, metrics=list(self.cfg["metrics"]))
        out = dict(result["scores"])
        lengths = [len(p.split()) for p in preds.values()]
        out.update(
            images=len(preds),
            mean_words=float(np.mean(lengths)) if lengths else 0.0,
            distinct_captions=len(set(preds.values())) / max(len(preds), 1),
        )
        return out, dict(refs=refs, skipped=result["skipped"])

    def baseline(self, preds: Mapping[int, str]) -> dict[str, float]:
        if self.constant is None:
            return {}
        refs = {i: self.refs[i] for i in preds}
        constant = {i: self.constant for i in preds}
        scores = caption_metrics.score(refs, constant, metrics=list(self.cfg["metrics"]))
        return {f"baseline/{k}": v for k, v in scores["scores"].items()}

    def write_results(self, preds: Mapping[int, str], path: str) -> None:
        caption_metrics.write_coco_results(preds, path)

    def page(self, last: Mapping[str, Any]) -> tuple[Mapping, Mapping, list[str]]:
        return (
            last["preds"],
            last["refs"],
            [f"{k} skipped: {v}" for k, v in last["skipped"].items()],
        )

    def describe(self) -> str:
        return f"{self.cfg['method']} decoding"


EVALUATORS = {"caption": CaptionEvaluator}
