"""Fine-tunes a whole pretrained ViT tower with a new head, optionally with layer-wise lr decay.

  cappa train --config configs/classify.py --workdir workdirs/classify        # a tower to start from
  cappa train --config configs/finetune.py --workdir workdirs/finetune
  cappa train --config configs/finetune.py:dataset=digits,layer_decay=0.6 --workdir DIR
  cappa train --config configs/finetune.py:tower=cappa_tiny --workdir DIR     # from workdirs/cappa_tiny

args (comma-separated, e.g. "tower=cappa_tiny,dataset=digits"):
  tower=classify (default) | cappa_tiny: the architecture of that config's image tower, loaded from
      config.model_init (default workdirs/<tower>; any run with that tower works: --config.model_init=DIR).
      The CapPa tower returns all tokens, so it gets a new MAP head (`img/map`), trained from scratch.
      tower=<big_vision variant> (e.g. "Ti/16") builds that ViT for a big_vision `.npz`, which you pass with
      --config.model_init=vit.npz (position embeddings are resampled to this 64x64 input).
  dataset=scenes (default; 42 classes, val = its validation split) | digits (scikit-learn's 8x8 digits,
      10 classes, upsampled to 64x64; trains on train[:1097], val = train[1097:], test only at the end).
  layer_decay=0.75: BEiT layer-wise lr decay: block i of a depth-D tower trains at lr * decay**(D - i), the
      stem at lr * decay**(D + 1), the head at lr. 1 disables it. Needs model.scan=False (checked at start).
"""

import ml_collections

from transfer.config import parse_arg, sibling
from transfer.optim import layerwise_lr_mults

cappa_tiny = sibling(__file__, "cappa_tiny.py")

# The image towers of our configs (must match their runs' checkpoints exactly).
TOWERS = {
    "classify": dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8, pool_type="gap"),
    "cappa_tiny": dict(cappa_tiny.get_config().model.img.to_dict(), pool_type="map"),
}
# dataset: (num_classes, train split, val split, test split, pp before value_range)
DATASETS = {
    "scenes": (42, "train", "validation", "test", "decode"),
    "digits": (10, "train[:1097]", "train[1097:]", "test", "decode|resize(64)"),
}


def _model(tower: str) -> tuple[dict, int, str | None, dict]:
    """(model config, depth, default model_init, model_load) of a tower arg."""
    dont_load = ["head/.*", "img/map/.*"]  # New heads: always trained from scratch.
    if tower in TOWERS:
        model = dict(TOWERS[tower])
        return model, model["depth"], f"workdirs/{tower}", dict(dont_load=dont_load)
    if "/" not in tower:
        raise ValueError(
            f"unknown tower {tower!r}: use {' or '.join(TOWERS)}, or a big_vision variant with its "
            "patch size, e.g. 'B/16'."
        )
    from pretrain.vit import decode_variant  # Only here: the depth of a named variant.

    depth = decode_variant(tower)["depth"]  # Unknown variant names raise, listing the known ones.
    model = dict(variant=tower, pool_type="gap")
    return model, depth, None, dict(dont_load=dont_load, dst_subtree="img")


def get_config(arg=None):
    args = parse_arg(arg, tower="classify", dataset="scenes", layer_decay="0.75")
    if args["dataset"] not in DATASETS:
        raise ValueError(f"unknown dataset {args['dataset']!r}; use one of {sorted(DATASETS)}.")
    num_classes, train_split, val_split, test_split, decode = DATASETS[args["dataset"]]
    model, depth, model_init, model_load = _model(args["tower"])
    layer_decay = float(args["layer_decay"])

    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.seed = 0
    # 2-4 minutes on 2 CPU cores. From a 400-step classify run (36% scenes val): digits 89% test
    # top-1, scenes 38.6% val.
    c.total_steps = 300

    c.input = dict(
        data=dict(name=args["dataset"], split=train_split),
        batch_size=64,
        pp=f"{decode}|value_range(-1, 1)|keep('image', 'label')",
        shuffle_buffer_size=5_000,
    )
    c.num_classes = num_classes
    c.model = dict(model, scan=False)
    c.model_init = model_init
    c.model_load = model_load

    c.optax_name = "adamw"
    c.lr = 1e-3
    c.wd = 1e-4  # Decoupled (scaled by the schedule and lr_mults, not by lr), as in configs/classify.py.
    c.grad_clip_norm = 1.0
    c.schedule = dict(decay_type="cosine", warmup_steps=30)
    c.lr_mults = layerwise_lr_mults(depth, layer_decay) if layer_decay != 1.0 else []

    c.log_training_steps = 25
    c.ckpt_steps = 300
    c.evals = dict(
        val=dict(type="mean", data=dict(split=val_split), log_steps=100),
        test=dict(type="mean", data=dict(split=test_split), log_steps=0),  # At the last step only.
    )
    c.mesh = [("data", -1)]
    return c
