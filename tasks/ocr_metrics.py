"""Text recognition metrics: exact match, character error rate (CER) and ANLS, in pure Python.

- Exact match: the prediction equals one of the references, optionally ignoring case and/or with
  whitespace normalised (stripped, runs collapsed to one space).
- CER: Levenshtein edits (insertions, deletions, substitutions) / reference length. Reported two
  ways: corpus-level (total edits / total reference characters, each example weighted by its
  length, the usual headline number) and the mean of per-example rates. The case and whitespace
  options apply as for exact match. CER can exceed 1 (a prediction much longer than the reference).
- ANLS (ST-VQA / DocVQA): per question, the best over its references of 1 - NL when NL < tau,
  else 0, where NL = edits / the longer string's length, on lower-cased, stripped text with runs of
  whitespace collapsed (fixed by the definition, whatever the options). tau = 0.5 by default; two
  empty strings are a perfect match.

All rates are fractions (not percent). An example may have several references (a list): exact
match takes any, ANLS the best, and CER the reference with the fewest edits (the first on a tie;
empty references are not candidates, and an example with only empty references has no CER, an
error).

Levenshtein distance is computed here: no installed dependency provides it, and OCR strings are
short enough for the plain O(len(a) * len(b)) dynamic programme.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a  # One row of the shorter string's length.
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            substitute = diagonal + (ca != cb)
            diagonal = row[j]
            row[j] = min(substitute, diagonal + 1, row[j - 1] + 1)
    return row[-1]


def normalize_text(
    text: str, *, ignore_case: bool = False, normalize_whitespace: bool = False
) -> str:
    """The text exact match and CER compare: optionally lower-cased and whitespace-normalised."""
    if ignore_case:
        text = text.lower()
    if normalize_whitespace:
        text = " ".join(text.split())
    return text


def _references(refs: str | Sequence[str]) -> list[str]:
    out = [refs] if isinstance(refs, str) else list(refs) if isinstance(refs, Iterable) else []
    if not out or not all(isinstance(r, str) for r in out):
        raise ValueError(
            f"references must be a string or a non-empty list of strings, got {refs!r}"
        )
    return out


def exact_match(
    prediction: str,
    refs: str | Sequence[str],
    *,
    ignore_case: bool = False,
    normalize_whitespace: bool = False,
) -> bool:
    """Whether the prediction equals one of the references (after the chosen normalisation)."""
    opts = {"ignore_case": ignore_case, "normalize_whitespace": normalize_whitespace}
    pred = normalize_text(prediction, **opts)
    return any(pred == normalize_text(r, **opts) for r in _references(refs))


def char_errors(
    prediction: str,
    refs: str | Sequence[str],
    *,
    ignore_case: bool = False,
    normalize_whitespace: bool = False,
) -> tuple[int, int]:
    """(edits, reference length) against the non-empty reference needing the fewest edits."""
    opts = {"ignore_case": ignore_case, "normalize_whitespace": normalize_whitespace}
    pred = normalize_text(prediction, **opts)
    candidates = [normalize_text(r, **opts) for r in _references(refs)]
    candidates = [r for r in candidates if r]
    if not candidates:
        raise ValueError(
            f"CER is undefined for an empty reference (edits / 0 characters): {refs!r}; "
            "give a non-empty reference or leave the example out"
        )
    return min(((levenshtein(pred, r), len(r)) for r in candidates), key=lambda e: e[0])


def anls(prediction: str, refs: str | Sequence[str], *, tau: float = 0.5) -> float:
    """Normalised Levenshtein similarity in [0, 1] of one answer, best over its references."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _references(refs):
        ref = " ".join(ref.lower().split())
        longer = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longer if longer else 0.0
        if distance < tau:
            best = max(best, 1.0 - distance)
    return best


def score(
    preds: Sequence[str],
    refs: Sequence[str | Sequence[str]],
    *,
    ignore_case: bool = False,
    normalize_whitespace: bool = False,
    tau: float = 0.5,
    per_example: bool = False,
) -> dict[str, Any]:
    """Exact match, CER and ANLS of predictions against their references (one entry per example).

    Returns {"exact_match": fraction, "cer": corpus CER, "cer_mean": mean per-example CER, "anls":
    mean ANLS, "num_examples": int, "num_ref_chars": int} and with `per_example` also
    "per_example": {"exact_match": [bool], "cer": [float], "anls": [float]}.
    """
    if len(preds) != len(refs):
        raise ValueError(
            f"{len(preds)} predictions but {len(refs)} references: give one per example"
        )
    if not preds:
        raise ValueError("no predictions to score")
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    opts = {"ignore_case": ignore_case, "normalize_whitespace": normalize_whitespace}
    matches, rates, similarities = [], [], []
    total_edits = total_chars = 0
    for n, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        try:
            if not isinstance(pred, str):
                raise ValueError(f"the prediction is not a string: {pred!r}")
            edits, chars = char_errors(pred, ref, **opts)
            matches.append(exact_match(pred, ref, **opts))
            similarities.append(anls(pred, ref, tau=tau))
        except ValueError as e:
            raise ValueError(f"example {n}: {e}") from None
        total_edits += edits
        total_chars += chars
        rates.append(edits / chars)
    result: dict[str, Any] = {
        "exact_match": sum(matches) / len(matches),
        "cer": total_edits / total_chars,
        "cer_mean": sum(rates) / len(rates),
        "anls": sum(similarities) / len(similarities),
        "num_examples": len(preds),
        "num_ref_chars": total_chars,
    }
    if per_example:
        result["per_example"] = {"exact_match": matches, "cer": rates, "anls": similarities}
    return result
