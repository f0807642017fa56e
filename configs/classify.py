"""A ViT classifier on the embedded `scenes` dataset (the engine's first task).

  cappa train --config configs/classify.py --workdir workdirs/classify
  cappa train --config configs/classify.py:frozen --workdir DIR --config.model_init=PRETRAINED_WORKDIR

arg "frozen" freezes the image tower (`img/.*`) and trains the head only. The tower can also come from a
big_vision ViT checkpoint: --config.model_init=vit.npz --config.model_load.dst_subtree=img
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.seed = 0
    c.total_steps = 800  # ~4 minutes on 2 CPU cores; ~40% val top-1 (chance: 2.4%).

    c.input = dict(
        data=dict(name="scenes", split="train"),
        batch_size=64,
        pp="decode|keep('image', 'label')|cache|value_range(-1, 1)",  # decoded once, kept in memory
        shuffle_buffer_size=5_000,
    )
    c.num_classes = 42  # scenes: shape (6) x colour (7) of the main object.
    c.model = dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=8, pool_type="gap")

    c.optax_name = "adamw"
    c.lr = 1e-3
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    if arg == "frozen":  # Tower from config.model_init, frozen: no gradient, no optimizer state.
        c.schedule = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=20))]
        c.model_load = dict(dont_load=["head/.*"])
    else:
        c.schedule = dict(decay_type="cosine", warmup_steps=100)

    c.log_training_steps = 50
    c.ckpt_steps = 200
    c.evals = dict(val=dict(type="mean", data=dict(split="validation"), log_steps=200))
    c.mesh = [("data", -1)]
    return c
