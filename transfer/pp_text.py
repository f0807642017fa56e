"""Text pp ops: `tokenize` turns a caption (or a vector of them) into SentencePiece ids (conventions in `tokenizer`).

A typical captioning pp string:

    decode|resize(64)|value_range(-1, 1)|flatten|choice(key="captions/text", outkey="text")|
    tokenize(max_len=16, model="tok.model", key="text", outkey="labels")|keep("image", "labels")

tensorflow_text is not a dependency, so the SentencePiece call runs through `tf.numpy_function`
(Python, under the GIL; cheap next to image decoding). `pp.parse` imports this module (one of
`pp.DEFAULT_MODULES`), so `tokenize` is in every pp string.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from transfer import pp
from transfer.tokenizer import Tokenizer

# (model path, pad_id, eos_id) -> loaded model; every pipeline and evaluator shares one copy.
_TOKENIZERS: dict[tuple[str, int | None, int | None], Tokenizer] = {}


def get_tokenizer(model: str, pad_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """The cached `Tokenizer` of a model path (loaded once per process)."""
    cache_key = (str(model), pad_id, eos_id)
    if cache_key not in _TOKENIZERS:
        _TOKENIZERS[cache_key] = Tokenizer(model, pad_id=pad_id, eos_id=eos_id)
    return _TOKENIZERS[cache_key]


@pp.register("tokenize")
def get_tokenize(
    max_len: int,
    model: str,
    key: str = "text",
    outkey: str | None = None,
    pad_id: int | None = None,
    eos_id: int | None = None,
) -> pp.Op:
    """String `key` -> int32 ids in `outkey` (default: `key`): pieces, EOS, pad. A scalar gives
    [max_len]; a vector of N strings (e.g. all captions, before a `cache` marker and a `choice`
    of the ids) gives [N, max_len], each row exactly the scalar op's ids for that string.

    An empty or blank caption fails the example, so the input pipeline drops it and counts it
    as skipped, like a corrupt image: a caption target of a lone EOS would teach nothing. For a
    vector this holds for every string in it.
    """
    if max_len < 2:
        raise ValueError(f"tokenize: max_len must be >= 2 (a piece and EOS), got {max_len}")
    # Loaded here, not inside the graph: a wrong path must fail the pp build, not drop every example.
    tok = get_tokenizer(model, pad_id, eos_id)

    def encode(text: bytes | np.ndarray) -> np.ndarray:
        text = np.asarray(text, dtype=object)
        texts = text.reshape(-1).tolist()
        ids = tok.encode(texts, max_len)
        blank = ids[:, 0] == tok.eos_id  # Nothing left after SentencePiece's normalisation.
        if blank.any():
            empty = texts[int(np.argmax(blank))]
            raise ValueError(f"tokenize: empty caption in {key!r} after normalisation: {empty!r}")
        return ids.reshape(*text.shape, max_len)

    def op(example: pp.Example) -> pp.Example:
        text = tf.convert_to_tensor(example[key])
        if text.dtype != tf.string or text.shape.rank not in (0, 1):
            raise ValueError(
                f"tokenize: {key!r} must be a string or a vector of strings, got "
                f"{text.dtype.name} of shape {text.shape}; pick one caption first, e.g. "
                f"choice(key=..., outkey={key!r})"
            )
        not_blank = tf.reduce_all(tf.strings.length(tf.strings.strip(text)) > 0)
        check = tf.debugging.Assert(not_blank, [f"tokenize: empty caption in {key!r}"])
        with tf.control_dependencies([check]):
            ids = tf.numpy_function(encode, [text], tf.int32, stateful=False)
        shape = [max_len] if text.shape.rank == 0 else [None, max_len]
        return {**example, outkey or key: tf.ensure_shape(ids, shape)}

    return op


def caption_pp(
    image_pp: str, tokenizer: str, max_len: int, *, cached: bool, key: str = "captions/text"
) -> str:
    """The captioning train pp: `image_pp` (uint8 ops, e.g. "decode|resize(64)") then [-1, 1], one of
    the image's captions `key` drawn per example and step, its ids in `labels`.

    `cached=True` (datasets that fit in memory): every caption is tokenized before a `cache`
    marker, so decoding and tokenizing run once per image (transfer/input_pipeline.py), and the
    draw is a `choice` of the ids at the same pp position as in the uncached string: both give
    the same batches.
    """
    tok = f"tokenize(max_len={max_len}, model='{tokenizer}'"
    if cached:
        return (
            f"{image_pp}|flatten|{tok}, key='{key}', outkey='caption_ids')|cache"
            "|choice(key='caption_ids', outkey='labels')|value_range(-1, 1)|keep('image', 'labels')"
        )
    return (
        f"{image_pp}|value_range(-1, 1)|flatten|choice(key='{key}', outkey='text')"
        f"|{tok}, key='text', outkey='labels')|keep('image', 'labels')"
    )
