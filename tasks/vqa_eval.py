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
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tasks import generation_eval, vqa_metrics, vqa_pp
from transfer import contracts, input_pipeline

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
            qid = generation_eval.id_value(batch[cfg["id_key"]][i])
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
class VqaEvaluator(generation_eval.GenerationEvaluator):
    """VQA accuracy of greedy answers over one pass of the eval split (see the module docstring)."""

    KIND, FOLDER, DEFAULTS = "vqa", "vqa", DEFAULTS
    PP_EXAMPLE = "decode|resize(64)|value_range(-1, 1)"

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        self.annotations = self.refs
        self.spell_numbers = bool(ctx.config.get("spell_numbers"))
        self.majority: tuple[str, dict] | None = None
        if self.cfg["majority_baseline"]:
            self.majority = majority_answers(read_annotations(ctx.config.input.data, self.cfg))

    def check_task(self, task: Any, config: Any) -> None:
        if not hasattr(task, "prefix_key") or not hasattr(getattr(task, "model", None), "txt_kw"):
            raise ValueError(
                f"the vqa evaluator needs a VQA task (tasks.vqa); got {config.task!r}."
            )

    def references(self, data: Mapping[str, Any], config: Any) -> dict:
        return read_annotations(data, self.cfg)

    def input_keys(self) -> tuple[str, ...]:
        return ("image", "prefix")

    def extra_pp(self, tokenizer_path: str, config: Any) -> str:
        """The question tokenized exactly as the task's training pp does."""
        return (
            f"|tokenize(max_len={int(config.question_len)}, model={tokenizer_path!r}, "
            f"key={self.cfg['question_key']!r}, outkey='prefix')"
        )

    def default_max_len(self, config: Any) -> int:
        return int(config.answer_len)

    def generate(self, params: Any, arrays: Mapping[str, Any]) -> Any:
        from pretrain import prefix_lm

        out = prefix_lm.generate(
            self.model,
            params,
            arrays["image"],
            arrays["prefix"],
            max_len=self.max_len,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            vocab_limit=self.vocab_limit,
            keep_on_device=True,
        )
        return out["tokens"]

    def texts(self, tokens: np.ndarray) -> list[str]:
        texts = [t.strip() for t in self.tokenizer.decode(tokens)]
        return [vqa_pp.digits_from_words(t) for t in texts] if self.spell_numbers else texts

    def _score(self, preds: Mapping[Any, str]) -> dict[str, Any]:
        anns = [self.annotations[q] for q in preds]
        return vqa_metrics.score_lists(
            list(preds.values()),
            [a.answers for a in anns],
            [a.answer_type for a in anns],
            [a.question_type for a in anns] if self.cfg["question_type_key"] else None,
        )

    def score(self, preds: Mapping[Any, str]) -> tuple[dict[str, float], dict[str, Any]]:
        out = accuracy_metrics(self._score(preds))
        out.update(
            questions=len(preds),
            distinct_answers=len(set(preds.values())) / max(len(preds), 1),
        )
        return out, {}

    def baseline(self, preds: Mapping[Any, str]) -> dict[str, float]:
        if self.majority is None:
            return {}
        overall, by_type = self.majority
        out = accuracy_metrics(self._score(dict.fromkeys(preds, overall)), "baseline/")
        if self.cfg["question_type_key"]:
            per_type = {q: by_type.get(self.annotations[q].question_type, overall) for q in preds}
            out["baseline_qtype/accuracy"] = self._score(per_type)["overall"]
        return out

    def write_results(self, preds: Mapping[Any, str], path: str) -> None:
        vqa_metrics.write_vqa_results(preds, path)

    def page(self, last: Mapping[str, Any]) -> tuple[Mapping, Mapping, list[str]]:
        """Each image with "question -> generated answer" and the human answers."""
        preds, ids = last["preds"], [q for _, q in last["samples"]]
        shown = {q: f"{self.annotations[q].question} -> {preds[q]}" for q in ids}
        return shown, {q: list(self.annotations[q].answers) for q in ids}, []

    def describe(self) -> str:
        return "greedy answers"


EVALUATORS = {"vqa": VqaEvaluator}
