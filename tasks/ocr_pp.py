"""The OCR pp ops (`config.pp_modules = ["tasks.ocr_pp"]`): `fold(parts)` turns a wide strip into a
square-ish image without resampling (configs/ocr.py says why), `lowercase(key)` folds a text's case."""

from __future__ import annotations

import tensorflow as tf

from transfer import pp


@pp.register("fold")
def get_fold(parts: int = 2, key: str = "image") -> pp.Op:
    """[H, W, C] -> [parts * H, W / parts, C]: the strip cut into `parts` equal pieces, left to right,
    stacked top to bottom (a 32x128 word strip becomes 64x64 with every pixel kept)."""
    if parts < 1:
        raise ValueError(f"fold: parts must be >= 1, got {parts}")

    def op(example: pp.Example) -> pp.Example:
        image = example[key]
        shape = tf.shape(image)
        check = tf.debugging.assert_equal(
            shape[1] % parts, 0, message=f"fold: image width not divisible by {parts}"
        )
        with tf.control_dependencies([check]):
            pieces = tf.split(image, parts, axis=1)
        return {**example, key: tf.concat(pieces, axis=0)}

    return op


@pp.register("lowercase")
def get_lowercase(key: str = "text", outkey: str | None = None) -> pp.Op:
    def op(example: pp.Example) -> pp.Example:
        return {**example, outkey or key: tf.strings.lower(example[key], encoding="utf-8")}

    return op
