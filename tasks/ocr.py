"""Text reading (OCR) fine-tunes of a CapPa run: ``config.task = "tasks.ocr"`` (configs/ocr.py).

Reading the text in an image is captioning with one reference: the model and loss are CapPa's captioning
branch (pretrain/cappa_task.py with ``masked_pred_prob=0``), the target is the image's text. The tower is
frozen, fine-tuned or lr-scaled and the decoder loaded or new, as in tasks/caption.py.

The ``ocr`` evaluator decodes an eval split on the loop's mesh (tasks/caption_eval.py's decoding) and
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
import os
from collections.abc import Mapping
from typing import Any

from pretrain import cappa_task
from tasks import caption_eval, ocr_metrics, report_utils, retrieval_eval, vqa_eval
from transfer import evaluators, input_pipeline, pp_text

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
            workdir, self.config, title="OCR fine-tune", kind="ocr", metrics=_REPORTED,
            count_key="images", files="ocr", filename="ocr.md",
        )  # fmt: skip


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
                refs[vqa_eval.id_value(image_id)] = list(dict.fromkeys(texts))  # unique, in order
    if not refs or not all(refs.values()):
        raise ValueError(
            f"ocr evaluator: an image without text under {text_key!r} in {dict(data)}."
        )
    return refs


class OcrEvaluator(caption_eval.CaptionEvaluator):
    """Exact match / CER / ANLS of decoded texts (caption_eval's decoding; see the module docstring)."""

    def __init__(self, eval_cfg: Mapping, *, task: Any, config: Any, **kwargs: Any):
        self.cfg = cfg = evaluators.settings(eval_cfg, EVAL_DEFAULTS, "ocr")
        caption_eval.require_captioner(task, f"task {config.task!r}")
        if not cfg["pp"]:
            raise ValueError("ocr evaluator: set `pp` (image preprocessing that produces 'image').")
        if cfg["method"] not in ("greedy", "beam"):
            raise ValueError(f"ocr evaluator: method={cfg['method']!r}; use greedy or beam.")
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError("ocr evaluator: set config.tokenizer (or evals.<name>.tokenizer).")
        self.tokenizer = pp_text.get_tokenizer(path, pad_id=getattr(task, "pad_id", None))
        self.model = task.model
        self.max_len = int(cfg["max_len"] or self.model.txt_kw["max_len"])
        id_key = cfg["id_key"]
        split_cfg = dict(
            data=cfg["data"],
            pp=f"{cfg['pp']}|keep('image', {id_key!r})",
            batch_size=cfg["batch_size"],
        )
        self.pass_ = retrieval_eval.SplitPass(
            split_cfg, ("image", id_key), "ocr", task=task, config=config, **kwargs
        )
        data = self.pass_.input_cfg["data"]
        self.refs = read_texts(data, cfg["text_key"], id_key, cfg["max_refs"])
        self.constant = None
        if cfg["majority_baseline"]:
            counts = collections.Counter(
                t
                for texts in read_texts(config.input.data, cfg["text_key"], id_key, 1).values()
                for t in texts
            )
            self.constant = counts.most_common(1)[0][0]
        self.reachable = self._reachable(list(self.refs.values()))
        self._baseline: dict[str, float] | None = None
        self._last: dict[str, Any] = {}

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

    def run(self, params: Any) -> dict[str, float]:
        preds, samples = self.predict(params)
        ids = list(preds)
        refs = [self.refs[i] for i in ids]
        result = ocr_metrics.score([preds[i] for i in ids], refs, **self._options())
        out = {k: float(result[k]) for k in _REPORTED}
        out.update(images=len(ids), reachable=self.reachable)
        if self.constant is not None:
            if self._baseline is None:
                base = ocr_metrics.score([self.constant] * len(ids), refs, **self._options())
                self._baseline = {f"baseline/{k}": float(base[k]) for k in _REPORTED}
            out.update(self._baseline)
        self._last = dict(preds=preds, samples=samples)
        return out

    def write(self, workdir: str, step: int, name: str) -> None:
        """`ocr/<name>_step<N>.json` ([{"image_id", "text"}]) and `ocr/<name>_samples.html`."""
        if not self._last:
            return
        folder = os.path.join(workdir, "ocr")
        os.makedirs(folder, exist_ok=True)
        preds = self._last["preds"]
        with open(os.path.join(folder, f"{name}_step{step}.json"), "w", encoding="utf-8") as f:
            json.dump([{"image_id": i, "text": t} for i, t in preds.items()], f)
        page = caption_eval.samples_html(
            self._last["samples"],
            preds,
            self.refs,
            title=f"{name}: step {step}, {self.cfg['method']}",
        )
        with open(os.path.join(folder, f"{name}_samples.html"), "w", encoding="utf-8") as f:
            f.write(page)


def read_predictions(path: str) -> dict[Any, str]:
    """{image id: text} of a file `OcrEvaluator.write` wrote."""
    with open(path, encoding="utf-8") as f:
        return {entry["image_id"]: entry["text"] for entry in json.load(f)}
