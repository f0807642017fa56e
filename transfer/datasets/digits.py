"""`digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset, no download.

The data is the UCI "optical recognition of handwritten digits" test set that scikit-learn ships
inside its package (`sklearn.datasets.load_digits`): each image is a 4x4-pixel block count
(0..16) of a 32x32 bitmap of one digit, so a small real-world classification problem that works
offline. scikit-learn is imported only when the dataset is generated.

Features:

* `image`: 8x8x3 uint8, PNG (lossless, so the stored pixels are exact). A count `v` in 0..16
  becomes `(255 * v + 8) // 16` (0 -> 0, 16 -> 255, rounded to nearest), the same grey in all
  three channels; ink is bright on a black background.
* `label` (10 classes, names "0".."9"): the digit.
* `index`: the row of the example in `load_digits()`, to trace an example back to its source.

Splits: `test` holds the first 500 and `train` the other 1,297 rows of the fixed permutation
`split_permutation()` of the 1,797 rows, in that order (`train[:k]` is a random subset). The
permutation comes from numpy's legacy `RandomState`, whose stream numpy keeps frozen, so every
machine builds the same splits. Not stratified: each class has 42..57 test examples.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_EXAMPLES = 1_797
NUM_TEST = 500
SPLIT_SEED = 0
LABEL_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


def split_permutation() -> np.ndarray:
    """The fixed order of the `load_digits()` rows: test = the first `NUM_TEST`, train = the rest."""
    return np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)


def split_indices() -> dict[str, np.ndarray]:
    """`load_digits()` row of every example of each split, in the split's order."""
    order = split_permutation()
    return {"train": order[NUM_TEST:], "test": order[:NUM_TEST]}


def to_image(counts: np.ndarray) -> np.ndarray:
    """64 block counts (0..16) -> an 8x8x3 uint8 image."""
    counts = np.asarray(counts).reshape(8, 8)
    if counts.min() < 0 or counts.max() > 16:
        raise ValueError(f"digit counts must lie in 0..16, got {counts.min()}..{counts.max()}")
    grey = (255 * counts.astype(np.int64) + 8) // 16
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def load_source() -> tuple[np.ndarray, np.ndarray]:
    """(counts [1797, 64], labels [1797]) as scikit-learn ships them."""
    from sklearn.datasets import load_digits  # Lazy: registering the builder needs no sklearn.

    data = load_digits()
    if data.data.shape != (NUM_EXAMPLES, 64):
        raise ValueError(
            f"load_digits() returned {data.data.shape}, expected ({NUM_EXAMPLES}, 64): this "
            "scikit-learn ships other data; install the version pinned in pyproject.toml."
        )
    return data.data, data.target


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, 8x8; generated locally from the installed package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                    "index": np.int64,
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Stored in permutation order, so slices are random subsets.
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        counts, labels = load_source()
        return {
            split: self._generate_examples(counts, labels, rows)
            for split, rows in split_indices().items()
        }

    def _generate_examples(self, counts: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        for position, row in enumerate(rows):
            yield (
                position,
                {
                    "image": encode_png(to_image(counts[row])),
                    "label": int(labels[row]),
                    "index": int(row),
                },
            )
