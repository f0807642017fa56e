"""A trained linear (or MAP) probe with a weight-decay sweep on a frozen image tower (tasks/linear_probe.py).

  cappa train --config configs/linear_probe.py:checkpoint=TOWER_WORKDIR --workdir DIR
  cappa train --config configs/linear_probe.py:head=map,dataset=digits,checkpoint=TOWER_WORKDIR --workdir DIR
  cappa train --config configs/linear_probe.py:cached=False --workdir DIR --config.model_init=TOWER_WORKDIR

args: head=linear|map; dataset=scenes|digits; checkpoint=TOWER_WORKDIR (default workdirs/cappa_tiny);
cached=True (the default: the tower is frozen and the pp has no augmentation, so features are extracted once,
cached on disk and the run holds no tower; the tower is input.data.checkpoint) or cached=False (the tower runs
live in every step, loaded by model_init: what a pp with augmentation needs).
Live mode builds the tower from --config.model.* (default: configs/cappa_tiny.py's image tower, 64x64 images);
in cached mode a workdir tower brings its own config. Training uses 90% of the train split, the wd is chosen on
the other 10%, and the chosen head is reported on the test split; WORKDIR/probe.md and probe.json hold the
numbers and the protocol. Minutes on 2 CPU cores.
"""

import ml_collections

from transfer.config import parse_arg, sibling

cappa_tiny = sibling(__file__, "cappa_tiny.py")

# configs/cappa_tiny.py's image tower.
TOWER = cappa_tiny.get_config().model.img.to_dict()
# name: (num_classes, image pp up to 64x64 in [-1, 1]); trained live, scenes keeps its decoded images in memory.
DATASETS = {
    "scenes": (42, "decode|keep('image', 'label')|cache|value_range(-1, 1)"),
    "digits": (10, "decode|resize(64)|value_range(-1, 1)|keep('image', 'label')"),
}


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false"):
        raise ValueError(f"cached={value!r}: use cached, cached=True or cached=False")
    return str(value).lower() == "true"


def get_config(arg=None):
    # The tower is frozen and the pp has no augmentation, so by default the probe trains on cached features.
    args = parse_arg(
        arg, head="linear", cached=True, dataset="scenes", checkpoint="workdirs/cappa_tiny"
    )
    if args["head"] not in ("linear", "map"):
        raise ValueError(f"head={args['head']!r}: use head=linear or head=map")
    if args["dataset"] not in DATASETS:
        raise ValueError(f"dataset={args['dataset']!r}: use one of {sorted(DATASETS)}")
    cached = _flag(args["cached"])
    num_classes, image_pp = DATASETS[args["dataset"]]
    layer = "final"
    pooling = "none" if args["head"] == "map" else "gap"  # MAP: all tokens, registers included.

    c = ml_collections.ConfigDict()
    c.task = "tasks.linear_probe"
    c.seed = 0
    c.total_steps = 600
    c.head = args["head"]
    c.num_classes = num_classes
    c.wd_sweep = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    c.features = dict(layer=layer, pooling=pooling)
    c.model = dict(TOWER)
    data = dict(name=args["dataset"], split="train[:90%]")
    if cached:
        data.update(
            source="pretrain.features:CachedSource",
            checkpoint=args["checkpoint"],
            layer=layer,
            pooling=pooling,
            pp=image_pp,
            cache_dir="workdirs/feature_cache",
        )
        pp = "keep('features', 'label')"
    else:
        c.model_init = args["checkpoint"]
        pp = image_pp
    c.input = dict(data=data, batch_size=64, pp=pp, shuffle_buffer_size=5_000)

    c.optax_name = "adam"
    c.lr = 0.1 if args["head"] == "linear" else 0.01
    c.wd = 0.0  # The sweep's L2 term is the weight decay; grad_clip_norm stays unset (it couples heads).
    c.schedule = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=30))]

    c.log_training_steps = 50
    c.ckpt_steps = 600
    c.evals = dict(
        probe=dict(
            type="probe", val=dict(split="train[90%:]"), test=dict(split="test"), log_steps=300
        )
    )
    c.mesh = [("data", -1)]
    return c
