"""OCR metrics: Levenshtein against a plain recursive edit distance, CER (corpus and mean) and ANLS
against direct computations from their definitions, hand-worked cases (threshold, case and
whitespace, several references) and the error paths. Pure Python."""

import functools
import random

import pytest

from tasks import ocr_metrics as om


def _recursive_distance(a: str, b: str) -> int:
    """Edit distance by its recursive definition (exponential without the cache, fine for short strings)."""

    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def _random_strings(seed: int, count: int, alphabet: str = "abcAB ") -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(count)]


def test_levenshtein_equals_recursive_definition():
    strings = _random_strings(0, 120)
    for a, b in zip(strings, strings[1:] + strings[:1], strict=True):
        assert om.levenshtein(a, b) == _recursive_distance(a, b) == om.levenshtein(b, a), (a, b)
    assert om.levenshtein("kitten", "sitting") == 3
    assert om.levenshtein("", "abc") == om.levenshtein("abc", "") == 3
    assert om.levenshtein("flaw", "lawn") == 2


def test_cer_corpus_and_mean_by_hand():
    # Edits 0, 1 (insert "c"), 2 (substitute both); reference lengths 3, 4, 2.
    result = om.score(["abc", "abd", "ab"], ["abc", "abcd", "xy"], per_example=True)
    assert result["cer"] == pytest.approx(3 / 9)
    assert result["cer_mean"] == pytest.approx((0 + 1 / 4 + 2 / 2) / 3)
    assert result["per_example"]["cer"] == pytest.approx([0, 0.25, 1.0])
    assert result["num_ref_chars"] == 9 and result["num_examples"] == 3
    assert om.score(["abcdef"], ["ab"])["cer"] == 2.0  # Insertions can push CER above 1.


def _corrupt(text: str, rng: random.Random, alphabet: str = "abcAB ") -> str:
    """`text` with 0-3 random insertions, deletions or substitutions (so some predictions match)."""
    chars = list(text)
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        i = rng.randint(0, len(chars))
        op = rng.choice(["insert", "delete", "substitute"]) if i < len(chars) else "insert"
        if op == "insert":
            chars.insert(i, rng.choice(alphabet))
        elif op == "delete":
            del chars[i]
        else:
            chars[i] = rng.choice(alphabet)
    return "".join(chars)


def test_score_equals_direct_computation_on_random_strings():
    rng = random.Random(1)
    refs = [s or "z" for s in _random_strings(2, 60)]  # CER needs non-empty references.
    preds = [_corrupt(r, rng) for r in refs]
    edits = [_recursive_distance(p, r) for p, r in zip(preds, refs, strict=True)]
    result = om.score(preds, refs, per_example=True)
    assert result["cer"] == pytest.approx(sum(edits) / sum(len(r) for r in refs))
    assert result["cer_mean"] == pytest.approx(
        sum(e / len(r) for e, r in zip(edits, refs, strict=True)) / len(refs)
    )
    assert result["exact_match"] == pytest.approx(
        sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
    )
    expected_anls = []
    for p, r in zip(preds, refs, strict=True):
        p, r = " ".join(p.lower().split()), " ".join(r.lower().split())
        nl = _recursive_distance(p, r) / max(len(p), len(r), 1)
        expected_anls.append(1 - nl if nl < 0.5 else 0.0)
    assert result["per_example"]["anls"] == pytest.approx(expected_anls)
    assert result["anls"] == pytest.approx(sum(expected_anls) / len(refs))
    assert 0 < result["anls"] < 1 and 0 < result["exact_match"] < 1  # The cases are not trivial.


def test_anls_by_hand():
    assert om.anls("hello", "hello") == 1.0
    assert om.anls("helo", "hello") == pytest.approx(0.8)  # 1 edit / 5.
    assert om.anls("abcxy", "abcde") == pytest.approx(0.6)  # NL 0.4 < 0.5.
    assert om.anls("ab", "ac") == 0.0  # NL exactly 0.5 is not below tau.
    assert om.anls("ab", "ac", tau=0.6) == 0.5
    assert om.anls("  Hello   World ", "hello world") == 1.0  # Case and whitespace never count.
    assert om.anls("", "") == 1.0
    assert om.anls("", "a") == 0.0
    assert om.anls("helo", ["world", "hello", "help"]) == pytest.approx(0.8)  # Best reference.
    assert om.anls("wrong", ["x", "nothing like it"]) == 0.0


def test_exact_match_and_cer_options():
    assert not om.exact_match("Hello  World", "hello world")
    assert not om.exact_match("Hello  World", "hello world", ignore_case=True)
    assert not om.exact_match("Hello  World", "hello world", normalize_whitespace=True)
    assert om.exact_match(
        "Hello  World", "hello world", ignore_case=True, normalize_whitespace=True
    )
    assert om.exact_match(" cat", ["dog", "cat"], normalize_whitespace=True)
    assert om.char_errors("HELLO", "hello") == (5, 5)
    assert om.char_errors("HELLO", "hello", ignore_case=True) == (0, 5)
    assert om.char_errors(" a  b ", "a b", normalize_whitespace=True) == (0, 3)
    on = om.score(["Hello  World"], ["hello world"], ignore_case=True, normalize_whitespace=True)
    assert on["exact_match"] == 1.0 and on["cer"] == 0.0
    off = om.score(["Hello  World"], ["hello world"])
    assert off["exact_match"] == 0.0 and off["cer"] == pytest.approx(3 / 11)
    assert off["anls"] == 1.0  # ANLS normalises case and whitespace regardless.


def test_cer_several_references_takes_fewest_edits():
    assert om.char_errors("cat", ["dog", "cats"]) == (1, 4)
    assert om.char_errors("ab", ["abc", "a"]) == (1, 3)  # Tie: the first.
    assert om.char_errors("ab", ["", "ab"]) == (0, 2)  # Empty references are no candidates.


def test_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        om.score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        om.score([], [])
    with pytest.raises(ValueError, match="example 1: the prediction is not a string"):
        om.score(["a", None], ["a", "b"])
    with pytest.raises(ValueError, match="example 0: references must be a string or a non-empty"):
        om.score(["a"], [[]])
    with pytest.raises(ValueError, match="references must be"):
        om.score(["a"], [[b"a"]])
    with pytest.raises(ValueError, match="example 1: CER is undefined for an empty reference"):
        om.score(["a", "b"], ["a", ["", ""]])
    with pytest.raises(ValueError, match="tau must be in"):
        om.score(["a"], ["a"], tau=0.0)
    with pytest.raises(ValueError, match="tau must be in"):
        om.anls("a", "a", tau=1.5)
