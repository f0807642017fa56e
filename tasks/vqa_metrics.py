"""VQA accuracy as the official VQAv2 evaluation script computes it, on in-memory lists or the
official files, and `cappa score-vqa`.

    cappa score-vqa --annotations v2_mscoco_val2014_annotations.json --preds results.json \
        [--questions v2_OpenEnded_mscoco_val2014_questions.json]

prints `score()`'s result as JSON: overall accuracy and accuracy per answer type ("yes/no", "number",
"other") and per question type, in percent (x100, as the official script reports; `score()` keeps
full precision, the CLI rounds to `--digits`, 2 by default like the official output).

Accuracy of one question: for each of its (10) human answers, the prediction scores
min(1, number of the OTHER answers it equals / 3); the question's accuracy is the mean over the
answers, so matching 1, 2, 3, 4+ of 10 answers gives 0.3, 0.6, 0.9, 1.0.

Answer processing, reproduced with the official script's quirks because published numbers include
them:
- Every answer and the prediction get tabs and newlines turned into spaces and are stripped.
- The full processing (`normalize_answer`) runs only when the stripped human answers are not all
  the same string (case-sensitive). When they all agree, the prediction is compared lower-cased
  but otherwise raw: against ten "2" answers, "two" and "2." score 0, against nine "2" and one
  "two" they score 1.0.
- Punctuation: each of ;/[]"{}()=+\\_-><@`,?! is deleted when the text has it next to a space, or
  has a comma between digits anywhere ("1,000" -> "1000"); otherwise it becomes a space
  ("black/white" -> "black white"). Apostrophes and colons are kept.
- Periods: a period is deleted unless a digit follows ("5." -> "5", "3.5" stays). The official
  pattern meant to keep periods after digits too, but its `(?!<=\\d)` is a look-ahead that always
  passes. It also passes `re.UNICODE` where `sub` takes a count, so at most 32 periods go.
- Then lower-case, split on whitespace, number words "none"/"zero".."ten" -> digits, articles
  "a"/"an"/"the" dropped, contractions written without an apostrophe restored ("dont" -> "don't").

The official script leaves one answer out by comparing answer records, which on VQAv2 files (every
answer has its own `answer_id`) is leaving out one position; that is what is done here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from transfer import config as config_lib

PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_NUMBERS = "zero one two three four five six seven eight nine ten".split()
NUMBER_WORDS = {"none": "0", **{word: str(n) for n, word in enumerate(_NUMBERS)}}
ARTICLES = frozenset({"a", "an", "the"})

# The contractions the official map restores: each one written without one of its apostrophes
# maps back to it ("couldnt've" and "couldn'tve" -> "couldn't've"; never "couldntve"). The
# capitalised "I" forms are there too but never match, because words are lower-cased first; its two
# entries that map a word to itself ("let's", "she's") are left out.
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am
    mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't
    she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
    someone'd've someone'll someone's something'd something'd've something'll that's there'd
    there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've
    we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
    who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
    y'all'd've you'd you'd've you'll you're you've
""".split()
CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word
    for word in _CONTRACTED
    for i, char in enumerate(word)
    if char == "'"
}
CONTRACTIONS["somebody'd"] = "somebodyd"  # Backwards in the official map; kept for equal scores.

_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # The official `sub` call's accidental count (the value of re.UNICODE).


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Whether a mark is deleted or spaced depends on the input text, not on earlier replacements.
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _process_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official full answer processing: whitespace, punctuation, periods, lower case, number
    words, articles, contractions ("The two dogs." -> "2 dogs", "1,000" -> "1000", "dont" -> "don't").

    `vqa_accuracy` applies it only when the human answers disagree, as the official script does.
    """
    return _process_words(_process_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of one question
    (normalised with `normalize_answer` only when the answers differ, as the module docstring says)."""
    answers = [_clean(a) for a in answers]
    prediction = _clean(prediction)
    if len(set(answers)) > 1:
        answers = [_process_words(_process_punctuation(a)) for a in answers]
        prediction = _process_words(_process_punctuation(prediction))
    prediction = prediction.lower()
    matches = [a.lower() == prediction for a in answers]
    total = sum(matches)
    # Same operations in the same order as the official script, so results are bit-identical.
    per_left_out = [min(1, float(total - m) / 3) for m in matches]
    return float(sum(per_left_out)) / len(per_left_out)


@dataclasses.dataclass(frozen=True)
class VqaAnnotation:
    """What scoring needs of one question: the human answers and the types results are grouped by."""

    answers: tuple[str, ...]
    answer_type: str
    question_type: str | None = None
    question: str | None = None  # Only shown in per-question results.


def _examples(ids: Sequence[Hashable], limit: int = 5) -> str:
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in list(ids)[:limit]) + more


def _check(
    annotations: Mapping[Hashable, VqaAnnotation], predictions: Mapping, subset: bool
) -> list[Hashable]:
    """Validates answers and coverage; returns the question ids to score (in `annotations` order)."""
    if not predictions:
        raise config_lib.InputError("no predictions to score")
    unknown = [q for q in predictions if q not in annotations]
    if unknown:
        raise config_lib.InputError(
            f"{len(unknown)} predicted questions have no annotation: {_examples(unknown)}; "
            "check that predictions and annotations use the same question ids (and id type)"
        )
    missing = [q for q in annotations if q not in predictions]
    if missing and not subset:
        raise config_lib.InputError(
            f"{len(missing)} annotated questions have no prediction: {_examples(missing)}; "
            "answer every question, or score only the answered ones with subset=True (--subset)"
        )
    ids = [q for q in annotations if q in predictions]
    for q in ids:
        if not isinstance(predictions[q], str):
            raise config_lib.InputError(
                f"prediction for question {q!r} is not a string: {predictions[q]!r}"
            )
        ann = annotations[q]
        answers = ann.answers
        if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
            raise config_lib.InputError(
                f"answers of question {q!r} must be a non-empty list of strings"
            )
        if not isinstance(ann.answer_type, str):
            raise config_lib.InputError(
                f"answer type of question {q!r} is not a string: {ann.answer_type!r}"
            )
    with_type = [q for q in ids if annotations[q].question_type is not None]
    if with_type and len(with_type) < len(ids):
        without = [q for q in ids if annotations[q].question_type is None]
        raise config_lib.InputError(
            f"{len(without)} questions have no question type, e.g. {_examples(without)}, while "
            f"{len(with_type)} have one; give a question type to all questions or to none"
        )
    return ids


def _percent_by(groups: dict[str, list[float]]) -> dict[str, float]:
    return {name: 100 * float(sum(accs)) / len(accs) for name, accs in groups.items()}


def score(
    annotations: Mapping[Hashable, VqaAnnotation],
    predictions: Mapping[Hashable, str],
    *,
    per_question: bool = True,
    subset: bool = False,
) -> dict[str, Any]:
    """VQA accuracy of one predicted answer per question, in percent like the official script.

    Returns {"overall": float, "per_answer_type": {type: float}, "per_question_type": {type: float}
    (empty when the annotations have no question types), "num_questions": int,
    "num_per_answer_type": {type: int}} and with `per_question` also "per_question": {question_id:
    {"accuracy": float, "prediction", "answer_type"[, "question"]}}. Groups are in first-seen order.
    Unanswered questions are an error unless `subset`; answers to unknown questions always are.
    """
    ids = _check(annotations, predictions, subset)
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    accuracies = []
    rows: dict[Hashable, dict[str, Any]] = {}
    for q in ids:
        ann = annotations[q]
        acc = vqa_accuracy(predictions[q], ann.answers)
        accuracies.append(acc)
        by_answer_type.setdefault(ann.answer_type, []).append(acc)
        if ann.question_type is not None:
            by_question_type.setdefault(ann.question_type, []).append(acc)
        if per_question:
            row = {
                "accuracy": 100 * acc,
                "prediction": predictions[q],
                "answer_type": ann.answer_type,
            }
            if ann.question is not None:
                row["question"] = ann.question
            rows[q] = row
    result: dict[str, Any] = {
        "overall": 100 * float(sum(accuracies)) / len(accuracies),
        "per_answer_type": _percent_by(by_answer_type),
        "per_question_type": _percent_by(by_question_type),
        "num_questions": len(ids),
        "num_per_answer_type": {name: len(accs) for name, accs in by_answer_type.items()},
    }
    if per_question:
        result["per_question"] = rows
    return result


def score_lists(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str],
    question_types: Sequence[str] | None = None,
    *,
    per_question: bool = False,
) -> dict[str, Any]:
    """`score` of parallel lists (one entry per question, e.g. the `answers` and `answer_type` of
    `scenes_vqa` examples); per-question results, when asked for, are keyed by list position."""
    n = len(predictions)
    lengths = {"answers": len(answers), "answer_types": len(answer_types)}
    if question_types is not None:
        lengths["question_types"] = len(question_types)
    wrong = {name: k for name, k in lengths.items() if k != n}
    if wrong:
        raise ValueError(f"{n} predictions but {wrong}: give one entry per question in every list")
    types = question_types if question_types is not None else [None] * n
    annotations = {
        i: VqaAnnotation(tuple(a) if not isinstance(a, str) else a, t, qt)
        for i, (a, t, qt) in enumerate(zip(answers, answer_types, types, strict=True))
    }
    return score(annotations, dict(enumerate(predictions)), per_question=per_question)


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise config_lib.MissingFileError(f"{path} does not exist (or is not a file).")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise config_lib.InputError(f"{path} is not valid JSON: {e}") from None


def _answers_of(entry: dict, path: str, n: int) -> tuple[str, ...]:
    answers = entry["answers"]
    if not isinstance(answers, list) or not answers:
        raise config_lib.InputError(f"{path}: annotation {n} has no list of answers")
    out = []
    for a in answers:
        if not (isinstance(a, dict) and isinstance(a.get("answer"), str)):
            raise config_lib.InputError(
                f"{path}: annotation {n} has an answer without an 'answer' string"
            )
        out.append(a["answer"])
    return tuple(out)


def read_vqa_annotations(
    path: str, questions_path: str | None = None
) -> dict[Hashable, VqaAnnotation]:
    """{question_id: VqaAnnotation} from a VQAv2 annotations file ({"annotations": [{question_id,
    answers: [{answer}], answer_type[, question_type]}]}), with the question texts of a VQAv2
    questions file ({"questions": [{question_id, question}]}) when given; its ids must match."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise config_lib.InputError(
            f"{path} is not a VQA annotations file (no 'annotations' list); "
            "a results file ([{'question_id', 'answer'}, ...]) goes to --preds"
        )
    texts = read_vqa_questions(questions_path) if questions_path else {}
    out: dict[Hashable, VqaAnnotation] = {}
    for n, entry in enumerate(data["annotations"]):
        needed = ("question_id", "answers", "answer_type")
        if not (isinstance(entry, dict) and all(k in entry for k in needed)):
            raise config_lib.InputError(
                f"{path}: annotation {n} lacks one of {needed}: {entry!r:.100}"
            )
        q = entry["question_id"]
        if q in out:
            raise config_lib.InputError(f"{path}: question {q!r} is annotated more than once")
        out[q] = VqaAnnotation(
            _answers_of(entry, path, n),
            entry["answer_type"],
            entry.get("question_type"),
            texts.get(q),
        )
    if questions_path:
        unasked = [q for q in out if q not in texts]
        extra = [q for q in texts if q not in out]
        if unasked or extra:
            raise config_lib.InputError(
                f"{questions_path} does not match {path}: {len(unasked)} annotated questions "
                f"missing ({_examples(unasked)}), {len(extra)} not annotated ({_examples(extra)}); "
                "use the questions file of the same split"
            )
    return out


def read_vqa_questions(path: str) -> dict[Hashable, str]:
    """{question_id: question} from a VQAv2 questions file ({"questions": [...]})."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise config_lib.InputError(f"{path} is not a VQA questions file (no 'questions' list)")
    out: dict[Hashable, str] = {}
    for n, entry in enumerate(data["questions"]):
        if not (isinstance(entry, dict) and "question_id" in entry and "question" in entry):
            raise config_lib.InputError(f"{path}: entry {n} has no 'question_id' and 'question'")
        out[entry["question_id"]] = entry["question"]
    return out


def read_vqa_results(path: str) -> dict[Hashable, str]:
    """{question_id: answer} from a VQA results file ([{"question_id", "answer"}, ...], one each)."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise config_lib.InputError(
            f"{path}: expected a results list [{{'question_id', 'answer'}}, ...]; "
            "an annotations file goes to --annotations"
        )
    out: dict[Hashable, str] = {}
    for n, entry in enumerate(data):
        if not (isinstance(entry, dict) and "question_id" in entry and "answer" in entry):
            raise config_lib.InputError(
                f"{path}: entry {n} has no 'question_id' and 'answer': {entry!r:.100}"
            )
        q, answer = entry["question_id"], entry["answer"]
        if not isinstance(answer, str):
            raise config_lib.InputError(
                f"{path}: the answer to question {q!r} is not a string: {answer!r}"
            )
        if q in out:
            raise config_lib.InputError(
                f"{path}: question {q!r} is answered more than once; keep one"
            )
        out[q] = answer
    return out


def write_vqa_results(predictions: Mapping[Hashable, str], path: str) -> None:
    """Writes {question_id: answer} as a VQA results file, the format the evaluation server takes."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"question_id": q, "answer": a} for q, a in predictions.items()], f)


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cappa score-vqa",
        description="Score VQA answers with the official VQAv2 accuracy; prints percentages as JSON.",
    )
    parser.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
    parser.add_argument("--preds", required=True, help="results JSON [{question_id, answer}]")
    parser.add_argument("--questions", help="VQAv2 questions JSON (checked; adds question texts)")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="score only the answered questions (default: unanswered questions are an error)",
    )
    parser.add_argument("--per_question", action="store_true", help="also print every question")
    parser.add_argument(
        "--digits", type=int, default=2, help="decimals printed (2, like the official script)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `cappa score-vqa`; returns the exit code (2 = bad input, message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        result = score(
            read_vqa_annotations(args.annotations, args.questions),
            read_vqa_results(args.preds),
            per_question=args.per_question,
            subset=args.subset,
        )
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_rounded(result, args.digits), indent=2))
    return 0
