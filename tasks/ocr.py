"""Text reading (OCR) fine-tunes of a CapPa run: ``config.task = "tasks.ocr"`` (configs/ocr.py).

Reading the text in an image is captioning with one reference: the model and loss are CapPa's captioning
branch (pretrain/cappa_task.py with ``masked_pred_prob=0``), the target is the image's text. The tower is
frozen, fine-tuned or lr-scaled and the decoder loaded or new, as in tasks/caption.py.

The ``ocr`` evaluator decodes an eval split on the loop's mesh (tasks/generation_eval.py) and
reports exact match, CER (corpus and mean) and ANLS (tasks/ocr_metrics.py), next to ``baseline/...``: the
most frequent training text predicted for every image. ``reachable`` is the fraction of references the
tokenizer can write at all (decode(encode(text)) == text, case-folded with ``ignore_case``): the ceiling
of exact match for a tokenizer with a small alphabet. ``write`` saves ``ocr/<name>_step<N>.json``
(``[{"image_id", "text"}]``) and ``ocr/<name>_samples.html``; ``finalize`` writes ``ocr.md``.

pp ops: tasks/ocr_pp.py (``fold``, ``lowercase``; a config lists it in ``pp_modules``).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import Any

from pretrain import cappa_task
from tasks import caption_eval, generation_eval, ocr_metrics, report_utils
from transfer import contracts, input_pipeline

DEFAULTS = dict(cappa_task.DEFAULTS, masked_pred_prob=0.0)
_REPORTED = ("exact_match", "cer", "cer_mean", "anls")

EVAL_DEFAULTS = dict(
    type="ocr",
    data=None,  # merged over config.input.data; set at least `split`
    pp=None,  # image preprocessing, e.g. "decode|fold(2)|value_range(-1, 1)"
    batch_size=None,
    log_steps=None,
    text_key="text",  # one string per image, or a sequence of references
    id_key="image/id",
    max_refs=5,
    method="greedy",  # "greedy" | "beam" (pretrain/decode.py)
    beam_size=4,
    length_penalty=0.0,
    max_len=None,  # None = the decoder's max_len
    tokenizer=None,  # None = config.tokenizer
    ignore_case=False,
    normalize_whitespace=True,
    majority_baseline=True,
    num_samples=16,
    seed=0,
)


# ------------------------------------------------------------------------------------------ the task
class Task(cappa_task.Task):
    """CapPa's captioning task reading text, with the OCR evaluator and a report."""

    def evaluators(self) -> dict[str, type]:
        return {**super().evaluators(), "ocr": OcrEvaluator}

    def finalize(self, workdir: str) -> None:
        report_utils.write_report(
            workdir,
            self.config,
            title="OCR fine-tune",
            kind="ocr",
            metrics=_REPORTED,
            count_key="images",
            files="ocr",
            filename="ocr.md",
        )


# ------------------------------------------------------------------------------------------ evaluator
def read_texts(data: Mapping[str, Any], text_key: str, id_key: str, max_refs: int) -> dict:
    """{image id: [reference texts]} of a whole split (images never decoded)."""
    pp_str = (
        f"flatten|tasks.vqa_pp.vqa_answers(key={text_key!r}, n={int(max_refs)}, outkey='refs')"
        f"|keep({id_key!r}, 'refs')"
    )
    refs: dict[Any, list[str]] = {}
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp_str}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for image_id, texts, real in zip(batch[id_key], batch["refs"], batch["_mask"], strict=True):
            if real:
                texts = [t.decode("utf-8") for t in texts if t.strip()]
                image_id = generation_eval.id_value(image_id)
                refs[image_id] = list(dict.fromkeys(texts))  # unique, in order
    if not refs or not all(refs.values()):
        raise ValueError(
            f"ocr evaluator: an image without text under {text_key!r} in {dict(data)}."
        )
    return refs


class OcrEvaluator(generation_eval.GenerationEvaluator):
    """Exact match / CER / ANLS of decoded texts (see the module docstring)."""

    KIND, FOLDER, DEFAULTS = "ocr", "ocr", EVAL_DEFAULTS
    METHODS = ("greedy", "beam")
    PP_EXAMPLE = "decode|fold(2)|value_range(-1, 1)"

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        cfg = self.cfg
        self.constant = None
        if cfg["majority_baseline"]:
            train = read_texts(ctx.config.input.data, cfg["text_key"], cfg["id_key"], 1)
            counts = collections.Counter(t for texts in train.values() for t in texts)
            self.constant = counts.most_common(1)[0][0]
        self.reachable = self._reachable(list(self.refs.values()))

    def check_task(self, task: Any, config: Any) -> None:
        caption_eval.require_captioner(task, f"task {config.task!r}")

    def references(self, data: Mapping[str, Any], config: Any) -> dict:
        return read_texts(data, self.cfg["text_key"], self.cfg["id_key"], self.cfg["max_refs"])

    def _options(self) -> dict[str, Any]:
        return dict(
            ignore_case=bool(self.cfg["ignore_case"]),
            normalize_whitespace=bool(self.cfg["normalize_whitespace"]),
        )

    def _reachable(self, refs: list[list[str]]) -> float:
        fold = (lambda s: s.lower()) if self.cfg["ignore_case"] else (lambda s: s)
        ok = 0
        for texts in refs:
            texts = [fold(t) for t in texts]
            ids = self.tokenizer.encode(texts, max(len(t) for t in texts) + 2)
            ok += any(d == t for d, t in zip(self.tokenizer.decode(ids), texts, strict=True))
        return ok / len(refs)

    def score(self, preds: Mapping[Any, str]) -> tuple[dict[str, float], dict[str, Any]]:
        refs = [self.refs[i] for i in preds]
        result = ocr_metrics.score(list(preds.values()), refs, **self._options())
        out = {k: float(result[k]) for k in _REPORTED}
        out.update(images=len(preds), reachable=self.reachable)
        return out, {}

    def baseline(self, preds: Mapping[Any, str]) -> dict[str, float]:
        if self.constant is None:
            return {}
        refs = [self.refs[i] for i in preds]
        base = ocr_metrics.score([self.constant] * len(refs), refs, **self._options())
        return {f"baseline/{k}": float(base[k]) for k in _REPORTED}

    def write_results(self, preds: Mapping[Any, str], path: str) -> None:
        """[{"image_id", "text"}]"""
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"image_id": i, "text": t} for i, t in preds.items()], f)


def read_predictions(path: str) -> dict[Any, str]:
    """{image id: text} of a file `OcrEvaluator.write` wrote."""
    with open(path, encoding="utf-8") as f:
        return {entry["image_id"]: entry["text"] for entry in json.load(f)}
