"""Embedded TFDS datasets, generated locally with no download.

Importing this package registers the builders `scenes`, `scenes_vqa` and `scenes_ocr` with TFDS,
so `tfds.builder(name, data_dir=...)` finds them. `EMBEDDED` lists their names for the input
pipeline, which prepares them on first use instead of expecting them on disk.
"""

from transfer.datasets import scenes, scenes_ocr, scenes_vqa  # noqa: F401  (registers builders)

EMBEDDED: tuple[str, ...] = ("scenes", "scenes_vqa", "scenes_ocr")

__all__ = ["EMBEDDED"]
