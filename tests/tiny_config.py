"""A classifier small enough to compile in seconds: the tests' shared config (`scenes/tiny`, 32 px)."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.seed = 0
    c.total_steps = 12
    c.input = dict(
        data=dict(name="scenes/tiny", split="train"),
        batch_size=16,
        pp="decode|resize(32)|value_range(-1, 1)|keep('image', 'label')",
        shuffle_buffer_size=64,
    )
    c.num_classes = 42
    c.model = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
    c.optax_name = "adamw"
    c.lr = 3e-3
    c.wd = 1e-4
    c.schedule = dict(decay_type="cosine", warmup_steps=2)
    c.log_training_steps = 1
    c.ckpt_steps = 6
    c.evals = dict(val=dict(data=dict(split="validation"), batch_size=16))
    return c
