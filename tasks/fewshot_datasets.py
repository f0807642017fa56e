"""The few-shot dataset table (tasks/fewshot.py's probe, configs/fewshot.py's arg): names -> TFDS specs.

A dataset's `pp` must give a float image in [-1, 1] and the label; `{res}` is replaced by the tower's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transfer.config import ConfigError

PP = "decode|resize({res})|value_range(-1, 1)|keep('image', 'label')"


def _spec(
    name: str,
    train_split: str = "train",
    test_split: str = "test",
    pp: str = PP,
    label_key: str = "label",
) -> dict[str, Any]:
    return dict(
        name=name,  # TFDS name (with config/version if needed, e.g. "scenes/tiny")
        train_split=train_split,  # shots and held-out train examples (for l2) come from here
        test_split=test_split,  # only ever scored, never used to choose anything
        pp=pp,
        label_key=label_key,
        data_dir=None,  # None = TFDS's default directory
    )


# big_vision's few-shot datasets with their usual splits, and the two that work offline here.
DATASETS = {
    "caltech101": _spec("caltech101"),
    "cars196": _spec("cars196"),
    "cifar100": _spec("cifar100"),
    "dtd": _spec("dtd"),
    "oxford_iiit_pet": _spec("oxford_iiit_pet"),
    "uc_merced": _spec("uc_merced", "train[:1000]", "train[1000:]"),
    "imagenet2012": _spec("imagenet2012", "train[:65000]", "validation"),
    # Rendered shapes, 42 classes (shape x colour of the main object); 5,000 train / 500 test.
    "scenes": _spec("scenes"),
    # The factors of the scenes label, probed one by one (what a tower has learnt: shape, colour, counting).
    **{
        f"scenes_{key}": _spec("scenes", pp=PP.replace("'label'", f"'{key}'"), label_key=key)
        for key in ("shape", "color", "count")
    },
    # scikit-learn's 8x8 handwritten digits, 10 classes; 1,297 train / 500 test.
    "digits": _spec("digits"),
}
PRESETS = {
    "local": ("scenes", "digits"),
    "scenes_factors": ("scenes_shape", "scenes_color", "scenes_count"),
    "big_vision": (
        "caltech101",
        "cars196",
        "cifar100",
        "dtd",
        "oxford_iiit_pet",
        "uc_merced",
        "imagenet2012",
    ),
}


def select(names: Sequence[str], data_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """{name: spec} of `DATASETS` entries (a preset name expands to its datasets)."""
    out = {}
    for name in names:
        for one in PRESETS.get(name, (name,)):
            if one not in DATASETS:
                raise ConfigError(f"unknown few-shot dataset {one!r}; known: {sorted(DATASETS)}")
            out[one] = dict(DATASETS[one], data_dir=data_dir)
    return out
