"""Optimizer rules: the update formula, schedules, freezing, multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transfer import config as config_lib
from transfer import optim, tree


def _config(**kw):
    return config_lib.merge_with_defaults(ml_collections.ConfigDict(kw))


PARAMS = {
    "img": {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones((2,))}},
    "head": {"kernel": jnp.full((2, 4), -1.0), "bias": jnp.zeros((4,))},
}
GRADS = jax.tree.map(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) - 1.5, PARAMS)


def _step(config, params=PARAMS, grads=GRADS, steps=1):
    rules = optim.resolve_rules(params, config)
    tx = optim.make_optimizer(config, rules)
    trainable = tree.partition(params, rules.is_trainable)[0]
    g = tree.partition(grads, rules.is_trainable)[0]
    state = tx.init(trainable)
    for _ in range(steps):
        updates, state = tx.update(g, state, trainable)
        trainable = jax.tree.map(jnp.add, trainable, updates)
    return trainable, state, rules


def test_sgd_update_formula_with_mults():
    lr, wd = 0.1, 0.01
    config = _config(
        optax_name="sgd",
        lr=lr,
        wd=wd,
        grad_clip_norm=None,
        schedule=dict(decay_type="constant"),
        lr_mults=[("img/.*", 0.5)],
        wd_mults=[(".*/kernel", 1.0), ("img/.*", 2.0)],
    )
    new, _, _ = _step(config)
    flat_p, flat_g, flat_new = tree.flatten(PARAMS), tree.flatten(GRADS), tree.flatten(new)
    for path, p in flat_p.items():
        lm = 0.5 if path.startswith("img/") else 1.0
        wm = 1.0 if path.endswith("/kernel") else (2.0 if path.startswith("img/") else 0.0)
        expected = np.asarray(p) + lm * (-lr * np.asarray(flat_g[path]) - wd * wm * np.asarray(p))
        np.testing.assert_allclose(flat_new[path], expected, rtol=1e-6, err_msg=path)


def test_adam_first_step_matches_numpy():
    lr, eps = 0.01, 1e-8
    config = _config(
        optax_name="adamw", lr=lr, wd=0.0, grad_clip_norm=None, schedule=dict(decay_type="constant")
    )
    new, _, _ = _step(config)
    for path, p in tree.flatten(PARAMS).items():
        g = np.asarray(tree.flatten(GRADS)[path])
        expected = np.asarray(p) - lr * g / (np.abs(g) + eps)
        np.testing.assert_allclose(tree.flatten(new)[path], expected, rtol=1e-5, atol=1e-7)


def test_clipping_scales_by_global_norm():
    config = _config(
        optax_name="sgd", lr=1.0, wd=0.0, grad_clip_norm=1.0, schedule=dict(decay_type="constant")
    )
    new, _, _ = _step(config)
    norm = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in tree.flatten(GRADS).values()))
    for path, p in tree.flatten(PARAMS).items():
        expected = np.asarray(p) - np.asarray(tree.flatten(GRADS)[path]) / norm
        np.testing.assert_allclose(tree.flatten(new)[path], expected, rtol=1e-5)


def test_frozen_params_have_no_state_and_are_untouched():
    config = _config(optax_name="adamw", schedule=[("img/.*", None), (".*", dict())])
    new, state, rules = _step(config, steps=3)
    assert set(tree.flatten(new)) == {"head/kernel", "head/bias"}
    state_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    ]
    assert state_paths and not any("img" in p for p in state_paths)
    assert not rules.is_trainable("img/dense/kernel")


def test_unmatched_param_is_an_error():
    config = _config(schedule=[("img/.*", None)])
    with pytest.raises(ValueError, match="head/"):
        optim.resolve_rules(PARAMS, config)


def test_two_schedules_per_param_group():
    config = _config(
        optax_name="sgd",
        lr=1.0,
        wd=0.0,
        grad_clip_norm=None,
        schedule=[
            ("img/.*", dict(decay_type="constant")),
            (".*", dict(decay_type="constant", warmup_steps=4)),
        ],
    )
    new, _, _ = _step(config)
    # Step 0 of a 4-step warmup scales the update by 1/4.
    g = np.asarray(GRADS["head"]["kernel"])
    np.testing.assert_allclose(new["head"]["kernel"], np.asarray(PARAMS["head"]["kernel"]) - g / 4)
    g = np.asarray(GRADS["img"]["dense"]["kernel"])
    np.testing.assert_allclose(
        new["img"]["dense"]["kernel"], np.asarray(PARAMS["img"]["dense"]["kernel"]) - g
    )


@pytest.mark.parametrize("decay_type", ["cosine", "linear", "rsqrt", "constant"])
def test_schedule_shapes(decay_type):
    total, warmup = 100, 10
    fn = optim.make_schedule(dict(decay_type=decay_type, warmup_steps=warmup, timescale=10), total)
    values = np.array([float(fn(s)) for s in range(total)])
    np.testing.assert_allclose(values[:warmup], (np.arange(warmup) + 1) / warmup, rtol=1e-6)
    assert values[warmup] == pytest.approx(1.0)
    progress = (np.arange(warmup, total) - warmup) / (total - warmup)
    expected = {
        "cosine": 0.5 * (1 + np.cos(np.pi * progress)),
        "linear": 1 - progress,
        "rsqrt": 1 / np.sqrt(1 + (np.arange(warmup, total) - warmup) / 10),
        "constant": np.ones_like(progress),
    }[decay_type]
    np.testing.assert_allclose(values[warmup:], expected, rtol=1e-5, atol=1e-6)


def test_unknown_schedule_key_and_optimizer():
    with pytest.raises(ValueError, match="warmup_stpes"):
        optim.make_schedule(dict(warmup_stpes=3), 10)
    with pytest.raises(ValueError, match="optax_name"):
        _step(_config(optax_name="adamm"))


@pytest.mark.parametrize("name", ["adafactor", "lion", "momentum", "muon"])
def test_named_optimizers_descend(name):
    """A quadratic's loss goes down with every named optimizer."""
    params = {"w": {"kernel": jnp.ones((4, 4)) * 3.0}}
    config = _config(
        optax_name=name, lr=0.05, wd=0.0, grad_clip_norm=None, schedule=dict(decay_type="constant")
    )
    rules = optim.resolve_rules(params, config)
    tx = optim.make_optimizer(config, rules)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"]["kernel"] ** 2)  # noqa: E731
    start = loss(params)
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = jax.tree.map(jnp.add, params, updates)
    assert loss(params) < start


# ---------------------------------------------------------------------------------------------- layer-wise decay
def _classifier_params(depth=4, scan=False, **vit_kw):
    """Shapes of a real classify-task tree (`img/...` ViT + `head/...`), without running init."""
    from tasks import classify

    model_cfg = dict(width=8, depth=depth, mlp_dim=16, num_heads=2, patch_size=8, scan=scan)
    model = classify.Classifier(3, classify.vit_kwargs({**model_cfg, **vit_kw}))
    image = jnp.zeros((1, 16, 16, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), image))["params"]


# Every parameter of one gelu/layernorm block, and decay=0.5 multipliers of a depth-4 tower written out by hand:
# stem id 0 -> 0.5**5, block_i id i+1 -> 0.5**(4-i), norm_final / map / head id 5 -> 1.
BLOCK_LEAVES = [
    f"{module}/{leaf}"
    for module, leaves in [
        ("norm_attn_pre", ["scale", "bias"]),
        ("attn/query", ["kernel", "bias"]),
        ("attn/key", ["kernel", "bias"]),
        ("attn/value", ["kernel", "bias"]),
        ("attn/out", ["kernel", "bias"]),
        ("norm_mlp_pre", ["scale", "bias"]),
        ("mlp/wi", ["kernel", "bias"]),
        ("mlp/wo", ["kernel", "bias"]),
    ]
    for leaf in leaves
]
BLOCK_MULTS = {0: 1 / 16, 1: 1 / 8, 2: 1 / 4, 3: 1 / 2}
MAP_LEAVES = ["map/probe", "map/norm/scale", "map/norm/bias"] + [
    f"map/{m}/{leaf}"
    for m in ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/wi", "mlp/wo"]
    for leaf in ["kernel", "bias"]
]


def _expected_mults(stem: list[str], after: list[str]) -> dict[str, float]:
    expected = {f"img/{name}": 1 / 32 for name in ["embedding/kernel", "embedding/bias"] + stem}
    for i, mult in BLOCK_MULTS.items():
        expected.update({f"img/encoder/block_{i}/{leaf}": mult for leaf in BLOCK_LEAVES})
    names = [
        "img/encoder/norm_final/scale",
        "img/encoder/norm_final/bias",
        "head/kernel",
        "head/bias",
    ]
    expected.update({name: 1.0 for name in names + [f"img/{a}" for a in after]})
    return expected


@pytest.mark.parametrize(
    "vit_kw,expected",
    [
        (
            dict(pool_type="map", num_registers=2),
            _expected_mults(["pos_embedding", "registers"], MAP_LEAVES),
        ),
        (dict(pool_type="tok"), _expected_mults(["pos_embedding", "cls"], [])),
        (dict(pool_type="gap", posemb="sincos2d"), _expected_mults([], [])),
    ],
)
def test_layerwise_mults_of_every_param_of_a_vit(vit_kw, expected):
    params = _classifier_params(**vit_kw)
    config = _config(lr_mults=optim.layerwise_lr_mults(4, 0.5))
    rules = optim.resolve_rules(params, config)
    assert (
        rules.lr_mult == expected
    )  # Same paths (none missed, none extra) and exact powers of 0.5.


def test_layerwise_decay_scales_sgd_updates_per_block():
    """Same gradient everywhere: block i moves decay**(depth - i) as far as the head, the stem decay**(depth+1)."""
    depth, decay, lr = 4, 0.75, 0.1
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), _classifier_params(depth))
    grads = jax.tree.map(jnp.ones_like, params)
    config = _config(
        optax_name="sgd",
        lr=lr,
        wd=0.0,
        grad_clip_norm=None,
        schedule=dict(decay_type="constant"),
        lr_mults=optim.layerwise_lr_mults(depth, decay),
    )
    tx = optim.make_optimizer(config, optim.resolve_rules(params, config))
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = {path: np.asarray(u) for path, u in tree.flatten(updates).items()}
    head = flat["head/kernel"]
    np.testing.assert_allclose(head, -lr)
    for path, update in flat.items():
        if path.startswith("img/encoder/block_"):
            i = int(path.split("/")[2].removeprefix("block_"))
            ratio = decay ** (depth + 1 - (i + 1))
        elif path.startswith(("img/embedding/", "img/pos_embedding")):
            ratio = decay ** (depth + 1)
        else:
            ratio = 1.0
        np.testing.assert_allclose(update / head[0, 0], ratio, rtol=1e-6, err_msg=path)


def test_layerwise_decay_refuses_a_scanned_encoder():
    params = _classifier_params(scan=True)
    assert "blocks" in params["img"]["encoder"]
    config = _config(lr_mults=optim.layerwise_lr_mults(4, 0.75))
    with pytest.raises(ValueError, match=r"img/encoder/blocks/.*model\.scan=False"):
        optim.resolve_rules(params, config)


def test_layerwise_decay_refuses_a_deeper_tower_and_bad_args():
    config = _config(lr_mults=optim.layerwise_lr_mults(2, 0.75))
    with pytest.raises(ValueError, match=r"img/encoder/block_2/.*more blocks than the depth=2"):
        optim.resolve_rules(_classifier_params(depth=4), config)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        optim.layerwise_lr_mults(0, 0.75)
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
        optim.layerwise_lr_mults(4, 1.5)


def test_layerwise_rules_follow_the_prefix_and_leave_later_rules_working():
    rules = optim.layerwise_lr_mults(1, 0.5, prefix="tower") + [("head/.*", 10.0)]
    params = {
        "tower": {"cls": 0, "encoder": {"block_0": {"w": 0}}},
        "img": {"cls": 0},
        "head": {"b": 0},
    }
    mults = optim.resolve_rules(params, _config(lr_mults=rules)).lr_mult
    assert mults == {
        "tower/cls": 0.25,
        "tower/encoder/block_0/w": 0.5,
        "img/cls": 1.0,
        "head/b": 10.0,
    }


def test_string_rule_values_reject_what_they_match():
    config = _config(wd_mults=[("img/.*", "no decay rules for the tower here")])
    with pytest.raises(ValueError, match="wd_mults rejects parameter 'img/dense/kernel': no decay"):
        optim.resolve_rules(PARAMS, config)
