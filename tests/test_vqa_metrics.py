"""VQA accuracy: the leave-one-out formula against a brute force over the 10 subsets of 9, the
official answer processing on hand-worked cases (incl. its quirks), per-type aggregation worked out by
hand, VQAv2 files, the CLI and the error paths. Pure Python."""

import itertools
import json
import random
import re

import pytest

from tasks import vqa_metrics as vm


def _subsets_accuracy(prediction: str, answers: list[str]) -> float:
    """The definition read literally: mean over the 10 subsets of 9 answers of min(1, matches / 3)."""
    n = len(answers)
    accs = [
        min(1.0, sum(a == prediction for a in subset) / 3)
        for subset in itertools.combinations(answers, n - 1)
    ]
    return sum(accs) / len(accs)


OTHER_ANSWERS = ["dog", "bird", "cow", "fox", "owl", "elk", "ant", "bee", "yak", "emu"]


@pytest.mark.parametrize(
    "k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_matching_k_of_10_answers(k, expected):
    answers = ["cat"] * k + OTHER_ANSWERS[k:]
    # Exact up to float summation order (the official sums in answer order too).
    assert vm.vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert vm.vqa_accuracy("cat", answers[::-1]) == pytest.approx(expected, abs=1e-12)


def test_equals_brute_force_over_subsets():
    rng = random.Random(0)
    words = ["red", "blue", "green", "2", "3", "yes", "no"]  # normalize_answer leaves these alone.
    for _ in range(300):
        answers = [rng.choice(words[: rng.randint(1, 7)]) for _ in range(10)]
        prediction = rng.choice(words)
        assert vm.vqa_accuracy(prediction, answers) == pytest.approx(
            _subsets_accuracy(prediction, answers), abs=1e-12
        )


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("the cat.", "cat"),
        ("A Dog", "dog"),
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("couldntve", "couldntve"),  # Only one apostrophe may be missing.
        ("Im", "im"),  # The map's "Im" never matches: words are lower-cased first.
        ("somebody'd", "somebodyd"),
        ("yall'd've", "y'all'd've"),
        ("twas", "'twas"),  # Backwards in the official map.
        ("it's", "it's"),
        ("1,000", "1000"),  # A comma between digits deletes all the punctuation.
        ("1,000 black/white", "1000 blackwhite"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),  # A mark next to a space is deleted.
        ("red-ish (dark)", "red ish dark"),
        ("5.", "5"),  # A period goes unless a digit follows...
        ("3.5", "3.5"),
        ("x" + "." * 40, "x" + "." * 8),  # ...but at most 32 go.
        ("  up\tthere\n", "up there"),
        ("10:30", "10:30"),  # Colons are not in the punctuation list.
    ],
)
def test_normalize_answer(raw, expected):
    assert vm.normalize_answer(raw) == expected


def test_contraction_map_has_the_official_entries():
    # The official map has 120 entries; 2 map a word to itself ("let's", "she's") and are left out.
    assert len(vm.CONTRACTIONS) == 118
    assert all(k.replace("'", "") == v.replace("'", "") for k, v in vm.CONTRACTIONS.items())


def test_processing_only_when_answers_disagree():
    assert vm.vqa_accuracy("two", ["2"] * 10) == 0.0  # All equal: compared raw (lower-cased).
    assert vm.vqa_accuracy("2.", ["2"] * 10) == 0.0
    assert vm.vqa_accuracy("YES", ["yes"] * 10) == 1.0
    assert vm.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # Whitespace is always cleaned.
    assert vm.vqa_accuracy("two", ["2"] * 9 + ["two"]) == 1.0  # All normalise to "2".
    assert vm.vqa_accuracy("2.", ["2"] * 9 + ["two"]) == 1.0
    # "Yes" and "yes" differ case-sensitively, so the processing runs: "yes!" matches all 10.
    assert vm.vqa_accuracy("yes!", ["Yes"] + ["yes"] * 9) == 1.0
    assert vm.vqa_accuracy("the cat", ["cat", "cats", "a cat"] + ["dog"] * 7) == 0.6


# Worked by hand: q1 1.0 (yes/no), q2 0.0 (yes/no), q3 0.6 (number, "two" -> "2" matches 2 of 10),
# q4 0.3 (other), q5 1.0 (other, "a red ball" -> "red ball").
ANSWERS = {
    1: ["yes"] * 10,
    2: ["no"] * 8 + ["yes"] * 2,
    3: ["2", "2", "3", "3", "3", "3", "4", "4", "4", "4"],
    4: ["red"] + ["blue"] * 9,
    5: ["red ball"] * 6 + ["ball"] * 4,
}
TYPES = {1: "yes/no", 2: "yes/no", 3: "number", 4: "other", 5: "other"}
QTYPES = {1: "is there a", 2: "is there a", 3: "how many", 4: "what color is the", 5: "what is"}
PREDS = {1: "yes", 2: "maybe", 3: "two", 4: "Red", 5: "a red ball"}
ACC = {1: 1.0, 2: 0.0, 3: 0.6, 4: 0.3, 5: 1.0}


def _annotations(with_qtypes=True):
    return {
        q: vm.VqaAnnotation(tuple(a), TYPES[q], QTYPES[q] if with_qtypes else None)
        for q, a in ANSWERS.items()
    }


def test_score_per_type_aggregation():
    result = vm.score(_annotations(), PREDS)
    assert result["overall"] == pytest.approx(100 * 2.9 / 5)
    assert result["per_answer_type"] == pytest.approx(
        {"yes/no": 50.0, "number": 60.0, "other": 65.0}
    )
    assert list(result["per_answer_type"]) == ["yes/no", "number", "other"]  # First-seen order.
    assert result["num_per_answer_type"] == {"yes/no": 2, "number": 1, "other": 2}
    assert result["per_question_type"] == pytest.approx(
        {"is there a": 50.0, "how many": 60.0, "what color is the": 30.0, "what is": 100.0}
    )
    assert result["num_questions"] == 5
    assert {q: row["accuracy"] for q, row in result["per_question"].items()} == pytest.approx(
        {q: 100 * a for q, a in ACC.items()}
    )
    assert result["per_question"][3] == {
        "accuracy": 60.0,
        "prediction": "two",
        "answer_type": "number",
    }


def test_score_lists_equals_score():
    ids = list(ANSWERS)
    lists = vm.score_lists(
        [PREDS[q] for q in ids], [ANSWERS[q] for q in ids], [TYPES[q] for q in ids]
    )
    by_id = vm.score(_annotations(with_qtypes=False), PREDS, per_question=False)
    assert lists == by_id and lists["per_question_type"] == {}
    with_rows = vm.score_lists(
        [PREDS[q] for q in ids],
        [ANSWERS[q] for q in ids],
        [TYPES[q] for q in ids],
        [QTYPES[q] for q in ids],
        per_question=True,
    )
    assert [r["accuracy"] for r in with_rows["per_question"].values()] == pytest.approx(
        [100 * ACC[q] for q in ids]
    )
    assert with_rows["per_question_type"] == vm.score(_annotations(), PREDS)["per_question_type"]


def test_score_errors():
    anns = _annotations()
    with pytest.raises(ValueError, match=r"1 predicted questions have no annotation: 99"):
        vm.score(anns, {**PREDS, 99: "yes"})
    with pytest.raises(ValueError, match="same question ids"):
        vm.score(anns, {str(q): p for q, p in PREDS.items()})
    partial = {q: PREDS[q] for q in (1, 3)}
    with pytest.raises(
        ValueError, match=r"3 annotated questions have no prediction: 2, 4, 5.*--subset"
    ):
        vm.score(anns, partial)
    sub = vm.score(anns, partial, subset=True)
    assert sub["num_questions"] == 2 and sub["overall"] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="no predictions"):
        vm.score(anns, {})
    with pytest.raises(ValueError, match="question 1 is not a string"):
        vm.score(anns, {**PREDS, 1: 2})
    with pytest.raises(ValueError, match="non-empty list of strings"):
        vm.score({**anns, 1: vm.VqaAnnotation("yes", "yes/no")}, PREDS)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        vm.score({**anns, 1: vm.VqaAnnotation((), "yes/no")}, PREDS)
    mixed = {**anns, 1: vm.VqaAnnotation(("yes",), "yes/no")}
    with pytest.raises(
        ValueError, match="1 questions have no question type.*to all questions or to none"
    ):
        vm.score(mixed, PREDS)
    with pytest.raises(ValueError, match=r"2 predictions but \{'answer_types': 1\}"):
        vm.score_lists(["yes", "no"], [["yes"], ["no"]], ["yes/no"])


def _write_vqa_files(tmp_path, preds=PREDS, with_questions=True):
    annotations = [
        {
            "question_id": q,
            "image_id": 100 + q,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                for n, a in enumerate(answers)
            ],
            "answer_type": TYPES[q],
            "question_type": QTYPES[q],
            "multiple_choice_answer": answers[0],
        }
        for q, answers in ANSWERS.items()
    ]
    (tmp_path / "ann.json").write_text(json.dumps({"annotations": annotations, "info": {}}))
    questions = [
        {"question_id": q, "image_id": 100 + q, "question": f"question {q}?"} for q in ANSWERS
    ]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    vm.write_vqa_results(preds, str(tmp_path / "res.json"))
    args = ["--annotations", str(tmp_path / "ann.json"), "--preds", str(tmp_path / "res.json")]
    return args + (["--questions", str(tmp_path / "q.json")] if with_questions else [])


def test_vqa_files_round_trip(tmp_path):
    _write_vqa_files(tmp_path)
    assert vm.read_vqa_results(str(tmp_path / "res.json")) == PREDS
    anns = vm.read_vqa_annotations(str(tmp_path / "ann.json"), str(tmp_path / "q.json"))
    assert anns == {
        q: vm.VqaAnnotation(tuple(ANSWERS[q]), TYPES[q], QTYPES[q], f"question {q}?")
        for q in ANSWERS
    }
    assert vm.read_vqa_annotations(str(tmp_path / "ann.json")) == _annotations()


def test_cli_prints_official_style_percentages(tmp_path, capsys):
    assert vm.main(_write_vqa_files(tmp_path)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"] == 58.0 and printed["per_answer_type"]["other"] == 65.0
    assert "per_question" not in printed
    assert vm.main([*_write_vqa_files(tmp_path), "--per_question", "--digits", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["per_question"]
    assert rows["4"] == {
        "accuracy": 30.0,
        "prediction": "Red",
        "answer_type": "other",
        "question": "question 4?",
    }


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda p: p["ann"].write_text("[]"), "not a VQA annotations file"),
        (lambda p: p["ann"].write_text("{not json"), "is not valid JSON"),
        (
            lambda p: p["ann"].write_text(
                json.dumps({"annotations": [{"question_id": 1, "answers": []}]})
            ),
            r"annotation 0 lacks one of \('question_id', 'answers', 'answer_type'\)",
        ),
        (
            lambda p: p["ann"].write_text(
                json.dumps(
                    {
                        "annotations": [
                            {"question_id": 1, "answers": ["yes"], "answer_type": "yes/no"}
                        ]
                    }
                )
            ),
            "annotation 0 has an answer without an 'answer' string",
        ),
        (lambda p: p["res"].write_text(json.dumps({"annotations": []})), "expected a results list"),
        (
            lambda p: p["res"].write_text(json.dumps([{"question_id": 1}])),
            "entry 0 has no 'question_id' and 'answer'",
        ),
        (
            lambda p: p["res"].write_text(json.dumps([{"question_id": 1, "answer": "a"}] * 2)),
            "question 1 is answered more than once",
        ),
        (
            lambda p: p["res"].write_text(json.dumps([{"question_id": 1, "answer": 2}])),
            "question 1 is not a string",
        ),
        (
            lambda p: p["res"].write_text(json.dumps([{"question_id": 1, "answer": "yes"}])),
            "4 annotated questions have no prediction",
        ),
        (
            lambda p: p["q"].write_text(
                json.dumps({"questions": [{"question_id": 1, "question": "?"}]})
            ),
            "4 annotated questions missing",
        ),
        (lambda p: p["q"].unlink(), "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, break_it, message):
    args = _write_vqa_files(tmp_path)
    break_it({"ann": tmp_path / "ann.json", "res": tmp_path / "res.json", "q": tmp_path / "q.json"})
    assert vm.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
