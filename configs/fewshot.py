"""Few-shot linear probes of a trained tower (`cappa probe`, tasks/fewshot.py).

  cappa probe --checkpoint workdirs/cappa_tiny --config configs/fewshot.py
  cappa probe --checkpoint WORKDIR --config configs/fewshot.py:big_vision,data_dir=~/tensorflow_datasets
  cappa probe --checkpoint WORKDIR --config configs/fewshot.py:scenes,cifar100 --config.shots="(1, 10)"

arg: dataset names of `DATASETS` (any number), `local` (the default: the embedded `scenes` and scikit-learn's
`digits`, prepared on this machine without a download), `scenes_factors` (the scenes label's factors one by
one: `scenes_shape`, `scenes_color`, `scenes_count`), `big_vision` (big_vision's few-shot set: prepare those
with `tfds build NAME` first), `data_dir=DIR` for every dataset. Per-dataset knobs are overridable, e.g.
`--config.datasets.cifar100.train_split='train[:10000]'`.

A dataset's `pp` must give a float image in [-1, 1] and the label; `{res}` is replaced by the tower's resolution
(its learnt position embedding), or by `resolution` when that is set.
"""

import ml_collections

from configs.common import parse_arg

PP = "decode|resize({res})|value_range(-1, 1)|keep('image', 'label')"


def _spec(name, train_split="train", test_split="test", pp=PP, label_key="label"):
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
        "caltech101", "cars196", "cifar100", "dtd", "oxford_iiit_pet", "uc_merced", "imagenet2012",
    ),
}  # fmt: skip


def select(names, data_dir=None):
    """{name: spec} of `DATASETS` entries (a preset name expands to its datasets)."""
    out = {}
    for name in names:
        for one in PRESETS.get(name, (name,)):
            if one not in DATASETS:
                raise ValueError(f"unknown few-shot dataset {one!r}; known: {sorted(DATASETS)}")
            out[one] = dict(DATASETS[one], data_dir=data_dir)
    return out


def get_config(arg=None):
    flags = {name: False for name in (*DATASETS, *PRESETS)}
    args = parse_arg(arg, data_dir=None, **flags)
    names = [n for n in flags if args[n] is True] or ["local"]
    c = ml_collections.ConfigDict()
    c.datasets = select(names, args["data_dir"])

    # "final" (after the last norm) or a block index (0-based, negative from the end).
    c.layer = "final"
    # gap | registers | tokens | cls | map | pre_logits (see pretrain/features.py).
    c.pooling = "gap"
    c.resolution = None  # None = the tower's; fills `{res}` in the datasets' pp
    c.shots = (1, 5, 10, 25)
    # Seed s: the first k per class of the train split's permutation seeded by s.
    c.seeds = (0, 1, 2)
    c.l2_grid = tuple(2.0**p for p in range(-6, 17))  # one eigh per (shots, seed) covers them all
    c.holdout_per_class = 10  # held-out TRAIN examples per class that choose l2 (after the shots)
    # A class with fewer than k train examples: "error" or "use_all" (all of them become shots).
    c.short_classes = "error"
    c.batch_size = 64  # images per feature-extraction step (a multiple of the device count)
    c.cache_dir = None  # features cache; None = <out>/cache
    return c
