"""The VQA pp ops (`config.pp_modules = ["tasks.vqa_pp"]`): `vqa_answers`, `majority_answer`,
`spell_numbers` (and `digits_from_words`, its inverse on predictions)."""

from __future__ import annotations

import re

import tensorflow as tf

from transfer import pp

NUMBER_WORDS = (
    "none",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)


@pp.register("vqa_answers")
def get_vqa_answers(key: str = "answers", n: int | None = 10, outkey: str = "answers") -> pp.Op:
    """The human answers as a sequence of strings. `n` given: exactly `n` strings, a single answer
    (rank 0) repeated `n` times, a sequence cut to its first `n` and padded with empty strings (dropped
    again when scoring). `n=None` (training): the sequence as it is, a single answer as a sequence of one."""

    def op(example: pp.Example) -> pp.Example:
        answers = tf.convert_to_tensor(example[key])
        if answers.dtype != tf.string or answers.shape.rank not in (0, 1):
            raise ValueError(
                f"vqa_answers: {key!r} must be a string or a sequence of strings, got "
                f"{answers.dtype.name} of shape {answers.shape}; set answers_key."
            )
        if n is None:
            return {**example, outkey: tf.reshape(answers, [-1])}
        if answers.shape.rank == 0:
            return {**example, outkey: tf.fill([n], answers)}
        answers = answers[:n]
        answers = tf.concat([answers, tf.fill([n - tf.shape(answers)[0]], "")], 0)
        return {**example, outkey: tf.ensure_shape(answers, [n])}

    return op


@pp.register("majority_answer")
def get_majority_answer(key: str = "answers", outkey: str = "answer") -> pp.Op:
    """The most frequent of a sequence of answers (ties: the first seen), a deterministic target."""

    def op(example: pp.Example) -> pp.Example:
        values, index, counts = tf.unique_with_counts(tf.reshape(example[key], [-1]))
        del index
        return {**example, outkey: values[tf.argmax(counts, output_type=tf.int32)]}

    return op


@pp.register("spell_numbers")
def get_spell_numbers(key: str = "answer", outkey: str | None = None) -> pp.Op:
    """Whole-word numbers 0-10 -> "none", "one" .. "ten" (a tokenizer without digits can then write
    them; `digits_from_words` maps predictions back)."""

    def op(example: pp.Example) -> pp.Example:
        text = example[key]
        for n in range(10, -1, -1):  # 10 before 1
            text = tf.strings.regex_replace(text, rf"\b{n}\b", NUMBER_WORDS[n])
        return {**example, outkey or key: text}

    return op


def digits_from_words(answer: str) -> str:
    """The inverse of `spell_numbers` on a predicted answer: number words -> digits."""
    words = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
    return re.sub(r"[a-z]+", lambda m: words.get(m.group(0), m.group(0)), answer)
