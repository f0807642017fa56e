"""The `vqa` evaluator: answer an eval split's questions greedily and score them with the VQA accuracy.

    evals.vqa = dict(type="vqa", data=dict(split="validation"), pp="decode|resize(64)|value_range(-1, 1)")

For tasks with a CapPa `model` and a question prefix (tasks/vqa.py): `pp` preprocesses the image; the question
is tokenized here exactly as the task's training pp does (`question_len` tokens into `prefix`), and answers
are decoded by pretrain/prefix_lm.py on the loop's mesh (images and questions split over the batch axes,
tokens gathered from every host). The human answers, answer types and question types are read once, at
start-up, from the split itself (text features only, images never decoded), keyed by `id_key`.

Scores: tasks/vqa_metrics.py (the official VQAv2 accuracy, in percent) overall and per answer type. Baselines
(`majority_baseline=True`, computed once): `baseline/...` answers every question with the most frequent
answer of the training split (all annotator answers counted), `baseline_qtype/accuracy` with the most
frequent answer of its question type (the overall one for unseen types). A dataset with one answer per
question (GQA) repeats it `max_answers` times, so its VQA accuracy is exact-match accuracy.

With the task's `spell_numbers` (a tokenizer without digits), answers were trained as number words and the
predictions' number words become digits again before scoring (what the VQA answer processing does anyway).

`write(workdir, step, name)`: `vqa/<name>_step<N>.json` (VQAv2 results format, `cappa score-vqa --preds`)
and `vqa/<name>_samples.html` (image, question -> generated answer, the human answers).
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tasks import caption_eval, retrieval_eval, vqa_metrics, vqa_pp
from transfer import evaluators, input_pipeline, pp_text, sharding

DEFAULTS = dict(
    type="vqa",
    data=None,  # merged over config.input.data; set at least `split`
    pp=None,  # image preprocessing, e.g. "decode|resize(64)|value_range(-1, 1)"
    batch_size=None,  # None = config.input.batch_size
    log_steps=None,
    question_key="question",
    answers_key="answers",  # a sequence of strings (VQAv2: 10) or one string (GQA)
    answer_type_key="answer_type",  # None: every question has the type "all"
    question_type_key="question_type",  # None: no per-question-type baseline
    id_key="question_id",
    max_answers=10,
    max_len=None,  # answer tokens decoded; None = the task's answer_len
    tokenizer=None,  # None = config.tokenizer
    majority_baseline=True,
    num_samples=16,
)


# ------------------------------------------------------------------------------------------ annotations
def id_value(value: Any) -> Any:
    """A question id from a batch: int for integer ids, str for byte-string ids (GQA)."""
    return value.decode("utf-8") if isinstance(value, bytes) else int(value)


def _text(value: Any) -> str:
    return value.decode("utf-8").strip() if isinstance(value, bytes) else str(value).strip()


def read_annotations(data: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """{question id: VqaAnnotation (answers without blanks, types, question)} of a whole split."""
    keys = [cfg["id_key"], cfg["question_key"], cfg["answer_type_key"], cfg["question_type_key"]]
    keys = [k for k in keys if k] + ["all_answers"]
    pp_str = (
        f"flatten|tasks.vqa_pp.vqa_answers(key={cfg['answers_key']!r}, n={int(cfg['max_answers'])}, "
        f"outkey='all_answers')|keep({', '.join(repr(k) for k in keys)})"
    )
    out: dict[Any, vqa_metrics.VqaAnnotation] = {}
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp_str}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for i, real in enumerate(batch["_mask"]):
            if not real:
                continue
            qid = id_value(batch[cfg["id_key"]][i])
            if qid in out:
                raise ValueError(
                    f"vqa evaluator: question id {qid!r} occurs twice in {dict(data)}; `id_key` "
                    f"({cfg['id_key']!r}) must identify questions."
                )
            answers = tuple(a for a in (_text(x) for x in batch["all_answers"][i]) if a)
            if not answers:
                raise ValueError(f"vqa evaluator: question {qid!r} has no answer.")
            atype = _text(batch[cfg["answer_type_key"]][i]) if cfg["answer_type_key"] else "all"
            qtype = _text(batch[cfg["question_type_key"]][i]) if cfg["question_type_key"] else None
            question = _text(batch[cfg["question_key"]][i])
            out[qid] = vqa_metrics.VqaAnnotation(answers, atype, qtype, question)
    if not out:
        raise ValueError(f"vqa evaluator: no questions in {dict(data)}.")
    return out


def majority_answers(annotations: Mapping[Any, vqa_metrics.VqaAnnotation]) -> tuple[str, dict]:
    """The most frequent answer over all answers, and per question type (ties: the first seen)."""
    overall: collections.Counter = collections.Counter()
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ann in annotations.values():
        overall.update(ann.answers)
        if ann.question_type is not None:
            by_type[ann.question_type].update(ann.answers)
    return overall.most_common(1)[0][0], {t: c.most_common(1)[0][0] for t, c in by_type.items()}


def accuracy_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """`vqa_metrics.score` -> flat metrics: accuracy and accuracy/<answer type> ("yes/no" -> yes_no)."""
    out = {f"{prefix}accuracy": result["overall"]}
    for name, value in result["per_answer_type"].items():
        out[f"{prefix}accuracy/{re.sub(r'[^A-Za-z0-9]+', '_', name)}"] = value
    return out


# ------------------------------------------------------------------------------------------ evaluator
class VqaEvaluator:
    """VQA accuracy of greedy answers over one pass of the eval split (see the module docstring)."""

    def __init__(self, eval_cfg: Mapping, *, task: Any, config: Any, **kwargs: Any):
        self.cfg = cfg = evaluators.settings(eval_cfg, DEFAULTS, "vqa")
        if not hasattr(task, "prefix_key") or not hasattr(getattr(task, "model", None), "txt_kw"):
            raise ValueError(
                f"the vqa evaluator needs a VQA task (tasks.vqa); got {config.task!r}."
            )
        if not cfg["pp"]:
            raise ValueError(
                "vqa evaluator: set `pp` (image preprocessing that produces 'image'), e.g. "
                '"decode|resize(64)|value_range(-1, 1)".'
            )
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError("vqa evaluator: set config.tokenizer (or evals.<name>.tokenizer).")
        self.tokenizer = pp_text.get_tokenizer(path, pad_id=task.pad_id)
        self.model, self.task = task.model, task
        self.max_len = int(cfg["max_len"] or config.answer_len)
        self.spell_numbers = bool(config.get("spell_numbers"))
        id_key = cfg["id_key"]
        question_pp = (
            f"|tokenize(max_len={int(config.question_len)}, model={path!r}, "
            f"key={cfg['question_key']!r}, outkey='prefix')"
        )
        split_cfg = dict(
            data=cfg["data"],
            pp=f"{cfg['pp']}{question_pp}|keep('image', 'prefix', {id_key!r})",
            batch_size=cfg["batch_size"],
        )
        self.pass_ = retrieval_eval.SplitPass(
            split_cfg, ("image", "prefix", id_key), "vqa", task=task, config=config, **kwargs
        )
        self.annotations = read_annotations(self.pass_.input_cfg["data"], cfg)
        self.majority: tuple[str, dict] | None = None
        if cfg["majority_baseline"]:
            self.majority = majority_answers(read_annotations(config.input.data, cfg))
        self._baseline: dict[str, float] | None = None
        self._last: dict[str, Any] = {}

    def _decode(self, params: Any, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        from pretrain import prefix_lm

        arrays = {"image": batch["image"], "prefix": batch["prefix"]}
        arrays = sharding.put_batch(arrays, self.pass_.batch_sharding)
        vocab = int(self.model.txt_kw["vocab_size"])
        out = prefix_lm.generate(
            self.model, params, arrays["image"], arrays["prefix"], max_len=self.max_len,
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
            vocab_limit=self.tokenizer.vocab_size if self.tokenizer.vocab_size < vocab else None,
            keep_on_device=True,
        )  # fmt: skip
        return caption_eval._gather(out["tokens"])

    def answers(self, tokens: np.ndarray) -> list[str]:
        texts = [t.strip() for t in self.tokenizer.decode(tokens)]
        return [vqa_pp.digits_from_words(t) for t in texts] if self.spell_numbers else texts

    def predict(self, params: Any) -> tuple[dict[Any, str], list[tuple[np.ndarray, Any]]]:
        """{question id: generated answer} over the split, and (image, id) of the first samples."""
        id_key, preds, samples = self.cfg["id_key"], {}, []
        for batch in self.pass_.batches():
            texts = self.answers(self._decode(params, batch))
            ids, mask = caption_eval._gather(batch[id_key]), caption_eval._gather(batch["_mask"])
            preds.update(
                {id_value(i): t for i, t, real in zip(ids, texts, mask, strict=True) if real}
            )
            for image, qid, real in zip(batch["image"], batch[id_key], batch["_mask"], strict=True):
                if real and len(samples) < int(self.cfg["num_samples"]):
                    samples.append((np.asarray(image), id_value(qid)))
        return preds, samples

    def _score(self, preds: Mapping[Any, str]) -> dict[str, Any]:
        anns = [self.annotations[q] for q in preds]
        return vqa_metrics.score_lists(
            list(preds.values()),
            [a.answers for a in anns],
            [a.answer_type for a in anns],
            [a.question_type for a in anns] if self.cfg["question_type_key"] else None,
        )

    def run(self, params: Any) -> dict[str, float]:
        preds, samples = self.predict(params)
        unknown = [q for q in preds if q not in self.annotations]
        if unknown:
            raise ValueError(f"vqa evaluator: questions {unknown[:5]} were answered but not read.")
        out = accuracy_metrics(self._score(preds))
        out.update(
            questions=len(preds),
            distinct_answers=len(set(preds.values())) / max(len(preds), 1),
        )
        if self.majority is not None:
            if self._baseline is None:
                overall, by_type = self.majority
                self._baseline = accuracy_metrics(
                    self._score(dict.fromkeys(preds, overall)), "baseline/"
                )
                if self.cfg["question_type_key"]:
                    per_type = {
                        q: by_type.get(self.annotations[q].question_type, overall) for q in preds
                    }
                    self._baseline["baseline_qtype/accuracy"] = self._score(per_type)["overall"]
            out.update(self._baseline)
        self._last = dict(preds=preds, samples=samples)
        return out

    def write(self, workdir: str, step: int, name: str) -> None:
        """`vqa/<name>_step<N>.json` (VQAv2 results) and `vqa/<name>_samples.html`."""
        if not self._last:
            return
        folder = os.path.join(workdir, "vqa")
        os.makedirs(folder, exist_ok=True)
        preds = self._last["preds"]
        vqa_metrics.write_vqa_results(preds, os.path.join(folder, f"{name}_step{step}.json"))
        shown = {
            q: f"{self.annotations[q].question} -> {preds[q]}" for _, q in self._last["samples"]
        }
        refs = {q: list(self.annotations[q].answers) for _, q in self._last["samples"]}
        page = caption_eval.samples_html(
            self._last["samples"], shown, refs, title=f"{name}: step {step}, greedy answers"
        )
        with open(os.path.join(folder, f"{name}_samples.html"), "w", encoding="utf-8") as f:
            f.write(page)


EVALUATORS = {"vqa": VqaEvaluator}
