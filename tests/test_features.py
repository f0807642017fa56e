"""Tower features: layers and poolings vs direct computation, sharded extraction order, the disk cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pretrain import features, vit

KW = dict(
    width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=8, num_registers=2, pool_type="none"
)
PP = "decode|resize(32)|value_range(-1, 1)|keep('image', 'label')"


@pytest.fixture(scope="module")
def tower():
    model = vit.ViT(**KW)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params = jax.tree.map(np.asarray, params)
    return features.Tower(dict(KW), params, "test", features.params_digest(params))


def _images(n=4):
    return jax.random.normal(jax.random.key(1), (n, 32, 32, 3))


def test_poolings_match_the_token_layout(tower):
    images = _images()
    tokens = np.asarray(features.features_fn(KW, "final", "none")(tower.params, images))
    _, aux = vit.ViT(**KW).apply({"params": tower.params}, images)
    np.testing.assert_allclose(tokens, aux["encoded"], rtol=1e-6)
    assert tokens.shape == (4, 16 + 2, 32)  # 4x4 patches, then 2 registers.
    want = {
        "gap": tokens[:, :16].mean(1),
        "registers": tokens[:, 16:].mean(1),
        "tokens": tokens.mean(1),
    }
    for pooling, expected in want.items():
        got = features.features_fn(KW, "final", pooling)(tower.params, images)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=pooling)


def test_block_index_is_the_residual_stream_after_that_block(tower):
    images = _images()
    _, state = vit.ViT(**KW).apply(
        {"params": tower.params},
        images,
        capture_intermediates=lambda mdl, _: isinstance(mdl, vit.Block),
        mutable=["intermediates"],
    )
    blocks = state["intermediates"]["encoder"]
    scanned = vit.unscanned_to_scan(tower.params)
    for i in range(KW["depth"]):
        expected = np.asarray(blocks[f"block_{i}"]["__call__"][0][0])
        for layer in (i, i - KW["depth"]):  # Negative indices count from the end.
            got = features.features_fn(KW, layer, "none")(tower.params, images)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        got = features.features_fn({**KW, "scan": True}, i, "none")(scanned, images)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bad_layer_and_pooling_say_what_is_wrong():
    with pytest.raises(ValueError, match="has 3 blocks"):
        features.features_fn(KW, 3)
    with pytest.raises(ValueError, match="no registers"):
        features.features_fn({**KW, "num_registers": 0}, "final", "registers")
    with pytest.raises(ValueError, match="own MAP head"):
        features.features_fn(KW, "final", "map")
    with pytest.raises(ValueError, match="one of"):
        features.features_fn(KW, "final", "mean")


def test_sharded_extraction_keeps_the_split_order(tower, data_dir):
    from transfer import input_pipeline

    data = {"name": "scenes/tiny", "split": "validation", "data_dir": data_dir}
    assert jax.device_count() == 8
    feats, labels = features.compute(
        features.features_fn(KW, "final", "gap"), tower.params, data, pp=PP, batch_size=16
    )
    ds = tfds.load("scenes/tiny", split="validation", data_dir=data_dir, shuffle_files=False)
    examples = list(tfds.as_numpy(ds))
    np.testing.assert_array_equal(labels, [e["label"] for e in examples])
    # Reference: the same preprocessed images through the unjitted model on one device.
    batch = next(iter(input_pipeline.eval_batches({"data": data, "pp": PP}, batch_size=16)))
    _, aux = vit.ViT(**KW).apply({"params": tower.params}, batch["image"][:5])
    np.testing.assert_allclose(feats[:5], np.asarray(aux["encoded"][:, :16].mean(1)), atol=1e-5)


def test_cache_hits_and_invalidates_when_the_tower_changes(tower, data_dir, tmp_path):
    data = {"name": "scenes/tiny", "split": "validation", "data_dir": data_dir}
    kw = dict(pp=PP, layer="final", pooling="gap", batch_size=16, cache_dir=str(tmp_path))
    first = features.extract(tower, data, **kw)
    second = features.extract(tower, data, **kw)
    assert not first.cached and second.cached and first.key == second.key
    np.testing.assert_array_equal(first.features, second.features)
    other_layer = features.extract(tower, data, **{**kw, "layer": 1})
    assert not other_layer.cached and other_layer.key != first.key
    changed = jax.tree.map(lambda a: a * 1.01, tower.params)
    retrained = features.Tower(tower.vit_kw, changed, tower.source, features.params_digest(changed))
    third = features.extract(retrained, data, **kw)
    assert not third.cached and third.key != first.key
    assert not np.allclose(third.features, first.features)


def test_tower_from_a_workdir_and_the_cached_source(tiny_run, data_dir, tmp_path):
    from transfer import input_pipeline

    tower = features.load_tower(tiny_run)
    assert tower.step == 6 and tower.vit_kw["width"] == 32 and "encoder" in tower.params
    cfg = dict(
        source="pretrain.features:CachedSource",
        name="scenes/tiny",
        split="validation",
        data_dir=data_dir,
        checkpoint=tiny_run,
        pp=PP,
        pooling="gap",
        cache_dir=str(tmp_path),
        batch_size=16,
    )
    direct = features.extract(tower, cfg, pp=PP, pooling="gap", batch_size=16)
    assert input_pipeline.num_examples(cfg) == len(direct.labels)
    batches = input_pipeline.eval_batches(
        {"data": cfg, "pp": "keep('features', 'label')"}, batch_size=16
    )
    got = np.concatenate([b["features"][b["_mask"] > 0] for b in batches])
    np.testing.assert_allclose(got, direct.features, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown input.data keys"):
        features.CachedSource({**cfg, "pooling_type": "gap"})


def test_cache_misses_when_the_run_is_trained_further(tiny_run, data_dir, tmp_path):
    """The same workdir path, a newer checkpoint: the digest (and so the cache key) follows the contents."""
    import json
    import shutil

    import ml_collections

    from transfer import train

    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run, workdir)
    data = {"name": "scenes/tiny", "split": "validation", "data_dir": data_dir}
    kw = dict(pp=PP, batch_size=16, cache_dir=str(tmp_path / "cache"))
    before = features.extract(features.load_tower(workdir), data, **kw)
    assert features.extract(features.load_tower(workdir), data, **kw).cached
    with open(f"{workdir}/config.json") as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.total_steps = 8  # Resumes at step 6 and writes a step-8 checkpoint.
    train.train(config, workdir)
    after = features.extract(features.load_tower(workdir), data, **kw)
    assert not after.cached and after.key != before.key
    assert not np.allclose(after.features, before.features)
