"""Embedded TFDS datasets, generated locally with no download.

Importing this package registers with TFDS the builders `scenes`, `scenes_vqa` and `scenes_ocr`
(rendered here) and `digits` (scikit-learn's handwritten digits, read from the installed package),
so `tfds.builder(name, data_dir=...)` finds them. `EMBEDDED` lists their names for the input
pipeline, which prepares them on first use instead of expecting them on disk.
"""

from transfer.datasets import digits, scenes, scenes_ocr, scenes_vqa  # noqa: F401  (registers builders)

EMBEDDED: tuple[str, ...] = ("scenes", "scenes_vqa", "scenes_ocr", "digits")

__all__ = ["EMBEDDED"]
