"""Text pp ops: `tokenize` turns one caption into SentencePiece ids (conventions in `tokenizer`).

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
    """Scalar string `key` -> int32 [max_len] ids in `outkey` (default: `key`): pieces, EOS, pad.

    An empty or blank caption fails the example, so the input pipeline drops it and counts it
    as skipped, like a corrupt image: a caption target of a lone EOS would teach nothing.
    """
    if max_len < 2:
        raise ValueError(f"tokenize: max_len must be >= 2 (a piece and EOS), got {max_len}")
    # Loaded here, not inside the graph: a wrong path must fail the pp build, not drop every example.
    tok = get_tokenizer(model, pad_id, eos_id)

    def encode(text: bytes) -> np.ndarray:
        ids = tok.encode(text, max_len)[0]
        if ids[0] == tok.eos_id:  # Nothing left after SentencePiece's normalisation.
            raise ValueError(f"tokenize: empty caption in {key!r} after normalisation: {text!r}")
        return ids

    def op(example: pp.Example) -> pp.Example:
        text = tf.convert_to_tensor(example[key])
        if text.dtype != tf.string or text.shape.rank != 0:
            raise ValueError(
                f"tokenize: {key!r} must be a scalar string, got {text.dtype.name} of shape "
                f"{text.shape}; pick one caption first, e.g. choice(key=..., outkey={key!r})"
            )
        not_blank = tf.strings.length(tf.strings.strip(text)) > 0
        check = tf.debugging.Assert(not_blank, [f"tokenize: empty caption in {key!r}"])
        with tf.control_dependencies([check]):
            ids = tf.numpy_function(encode, [text], tf.int32, stateful=False)
        return {**example, outkey or key: tf.ensure_shape(ids, [max_len])}

    return op
