"""Tests for pretrain/bv_import.py.

The ``.npz`` files are written in big_vision's layout from a naming table spelled out here (not from the module's
mapping), then loaded into freshly initialised tiny ViTs: loaded params must be bit-identical to the source and give
identical outputs.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from pretrain import bv_import, ckpt_import
from pretrain.vit import ViT, unscanned_to_scan
from transfer import tree

RES = 32
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, num_classes=5)
POOLS = {
    "map": dict(pool_type="map"),
    "tok": dict(pool_type="tok", cls_posemb=False),
    "gap": dict(pool_type="gap"),
}

# big_vision's names, written out: our path -> big_vision path (inside one encoder block for BV_BLOCK).
BV_BLOCK = {
    "norm_attn_pre/scale": "LayerNorm_0/scale",
    "norm_attn_pre/bias": "LayerNorm_0/bias",
    "norm_mlp_pre/scale": "LayerNorm_1/scale",
    "norm_mlp_pre/bias": "LayerNorm_1/bias",
    "mlp/wi/kernel": "MlpBlock_0/Dense_0/kernel",
    "mlp/wi/bias": "MlpBlock_0/Dense_0/bias",
    "mlp/wo/kernel": "MlpBlock_0/Dense_1/kernel",
    "mlp/wo/bias": "MlpBlock_0/Dense_1/bias",
}
for _proj in ("query", "key", "value", "out"):
    for _leaf in ("kernel", "bias"):
        BV_BLOCK[f"attn/{_proj}/{_leaf}"] = f"MultiHeadDotProductAttention_0/{_proj}/{_leaf}"
BV_TOP = {
    "embedding/kernel": "embedding/kernel",
    "embedding/bias": "embedding/bias",
    "pos_embedding": "pos_embedding",
    "cls": "cls",
    "encoder/norm_final/scale": "Transformer/encoder_norm/scale",
    "encoder/norm_final/bias": "Transformer/encoder_norm/bias",
    "map/probe": "MAPHead_0/probe",
    "map/norm/scale": "MAPHead_0/LayerNorm_0/scale",
    "map/norm/bias": "MAPHead_0/LayerNorm_0/bias",
    "head/kernel": "head/kernel",
    "head/bias": "head/bias",
}
for _k, _v in BV_BLOCK.items():  # the MAP head's attention and MLP are named as in a block
    if not _k.startswith("norm"):
        BV_TOP[f"map/{_k}"] = f"MAPHead_0/{_v}"


def to_big_vision(params, scanned=False, prefix=""):
    """Our param tree -> big_vision's flat npz dict, through the hand-written tables above."""
    out, stacks = {}, {}
    for path, value in tree.flatten(params).items():
        value = np.asarray(value)
        m = re.fullmatch(r"encoder/block_(\d+)/(.+)", path)
        if m is None:
            out[BV_TOP[path]] = value
        elif scanned:
            stacks.setdefault(BV_BLOCK[m[2]], {})[int(m[1])] = value
        else:
            out[f"Transformer/encoderblock_{m[1]}/{BV_BLOCK[m[2]]}"] = value
    for name, layers in stacks.items():
        out[f"Transformer/encoderblock/{name}"] = np.stack([layers[i] for i in sorted(layers)])
    return {prefix + k: v for k, v in out.items()}


def make(res=RES, **kw):
    """(model, "freshly initialised" params): random values of the init's shapes, without compiling the init."""
    model = ViT(**{**TINY, **kw})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"]
    return model, randomised(shapes, seed=0)


def apply(model, params, image):
    return jax.jit(model.apply)({"params": params}, image)


def randomised(params, seed=1):
    """Every leaf random (zero-initialised heads and biases would compare equal by accident)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), params)


def save(tmp_path, flat, name="ckpt.npz"):
    path = str(tmp_path / name)
    np.savez(path, **flat)
    return path


def assert_same(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        assert np.array_equal(np.asarray(fa[path]), np.asarray(fb[path])), path


@pytest.fixture(scope="module")
def image():
    return np.asarray(jax.random.normal(jax.random.key(42), (2, RES, RES, 3)))


@pytest.mark.parametrize("pool", list(POOLS))
def test_roundtrip_is_bit_identical(tmp_path, image, pool):
    model, fresh = make(**POOLS[pool])
    src = randomised(fresh)
    path = save(tmp_path, to_big_vision(src))
    mapped = bv_import.vit_from_big_vision(bv_import.read_npz(path))
    assert {k: v.shape for k, v in mapped.items()} == {
        k: v.shape for k, v in tree.flatten(fresh).items()
    }
    new, report = ckpt_import.load_into(fresh, path)
    assert_same(new, src)
    n = len(tree.flatten(fresh))
    assert report["num_loaded"] == n and len(report["loaded"]) == n
    assert report["resampled"] == report["kept_init"] == report["skipped"] == []
    (out_src, aux_src), (out_new, aux_new) = apply(model, src, image), apply(model, new, image)
    assert np.array_equal(out_src, out_new)
    assert np.array_equal(aux_src["encoded"], aux_new["encoded"])


def test_scanned_checkpoint_into_unscanned_and_scanned_models(tmp_path, image):
    model, fresh = make(pool_type="map")
    src = randomised(fresh)
    path = save(tmp_path, to_big_vision(src, scanned=True))
    assert any(k.startswith("Transformer/encoderblock/") for k in np.load(path).files)
    new, _ = ckpt_import.load_into(fresh, path)
    assert_same(new, src)
    scan_model, scan_fresh = make(pool_type="map", scan=True)
    new_scan, report = ckpt_import.load_into(scan_fresh, path)
    assert_same(new_scan, unscanned_to_scan(src))
    assert "encoder/blocks/mlp/wi/kernel" in report["loaded"]
    np.testing.assert_allclose(
        apply(scan_model, new_scan, image)[0],
        apply(model, src, image)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    # An unscanned checkpoint into a scanned model, keeping the init of one sub-tree.
    path2 = save(tmp_path, to_big_vision(src), "unscanned.npz")
    new_scan2, report2 = ckpt_import.load_into(
        scan_fresh, path2, dont_load=[r"encoder/blocks/mlp/.*"]
    )
    flat_new, flat_init = tree.flatten(new_scan2), tree.flatten(scan_fresh)
    assert sorted(report2["kept_init"]) == sorted(p for p in flat_init if "/blocks/mlp/" in p)
    assert np.array_equal(
        flat_new["encoder/blocks/mlp/wi/kernel"], flat_init["encoder/blocks/mlp/wi/kernel"]
    )


def test_prefixed_checkpoint_into_nested_params(tmp_path):
    _, fresh = make(pool_type="gap")
    src = randomised(fresh)
    txt = {"txt/Embed_0/embedding": np.ones((7, 4), np.float32), "t": np.float32(10.0)}
    path = save(tmp_path, {**to_big_vision(src, prefix="img/"), **txt})
    other = {"w": np.zeros(3, np.float32)}
    new, report = ckpt_import.load_into(
        {"img": fresh, "txt": other}, path, prefix="img", dst_prefix="img"
    )
    assert_same(new["img"], src)
    assert new["txt"]["w"] is other["w"]
    assert report["outside_prefix"] == ["t", "txt/Embed_0/embedding"]
    assert report["loaded"][0].startswith("img/")
    _, report = ckpt_import.load_into(
        {"img": fresh}, path, prefix="img/", dst_prefix="img", dont_load=[r"img/head/.*"]
    )
    assert sorted(report["kept_init"]) == ["img/head/bias", "img/head/kernel"]
    new, report = ckpt_import.load_into(
        fresh, path
    )  # no prefix: a ViT takes the file's image tower
    assert_same(new, src)
    assert report["other_tower"] == ["t", "txt/Embed_0/embedding"]


def test_resample_posemb_matches_scipy_zoom():
    pe = np.asarray(jax.random.normal(jax.random.key(0), (1, 16, 32)))
    for new_grid in [(8, 8), (6, 10), (3, 3)]:
        zoom = (new_grid[0] / 4, new_grid[1] / 4, 1)
        want = scipy.ndimage.zoom(pe.reshape(4, 4, 32), zoom, order=1).reshape(1, -1, 32)
        got = bv_import.resample_posemb(pe, new_grid)
        assert got.shape == (1, new_grid[0] * new_grid[1], 32) and got.dtype == pe.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    const = bv_import.resample_posemb(np.full((1, 16, 8), 0.3, np.float32), (8, 8))
    np.testing.assert_allclose(const, 0.3, rtol=0, atol=1e-7)
    assert np.array_equal(bv_import.resample_posemb(pe, (4, 4)), pe)


def test_load_resamples_posemb_to_another_grid(tmp_path):
    _, fresh = make(pool_type="gap")
    src = randomised(fresh)
    path = save(tmp_path, to_big_vision(src))
    _, big = make(res=64, pool_type="gap")  # 8x8 patches instead of 4x4
    new, report = ckpt_import.load_into(big, path)
    assert report["resampled"] == ["pos_embedding"]
    want = scipy.ndimage.zoom(src["pos_embedding"].reshape(4, 4, 32), (2, 2, 1), order=1)
    np.testing.assert_allclose(new["pos_embedding"], want.reshape(1, 64, 32), rtol=1e-5, atol=1e-6)
    assert np.array_equal(new["embedding"]["kernel"], src["embedding"]["kernel"])
    # A non-square target grid (32x64 images: 4x8 patches) needs to be told its grid.
    model = ViT(**TINY, pool_type="gap")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 64, 3)))["params"]
    wide = randomised(shapes)
    with pytest.raises(ValueError, match=r"pos_embedding: .*\(1, 16, 32\).*\(1, 32, 32\).*grid="):
        ckpt_import.load_into(wide, path)
    new, _ = ckpt_import.load_into(wide, path, grid=(4, 8))
    want = scipy.ndimage.zoom(src["pos_embedding"].reshape(4, 4, 32), (1, 2, 1), order=1)
    np.testing.assert_allclose(new["pos_embedding"], want.reshape(1, 32, 32), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("res", [RES, 64])
def test_class_token_posemb_is_explained(tmp_path, res):
    _, fresh = make(pool_type="tok", cls_posemb=False)
    path = save(tmp_path, to_big_vision(randomised(fresh)))
    _, target = make(
        res=res, pool_type="tok"
    )  # cls_posemb=True: one more token than big_vision has
    with pytest.raises(ValueError, match=r"cls_posemb=False") as e:
        ckpt_import.load_into(target, path)
    assert "class token" in str(e.value) and "pos_embedding" in str(e.value)


def test_shape_mismatch_names_paths_and_shapes(tmp_path):
    _, fresh = make(pool_type="gap")
    path = save(tmp_path, to_big_vision(randomised(fresh)))
    _, target = make(pool_type="gap", num_classes=7)
    with pytest.raises(ValueError) as e:
        ckpt_import.load_into(target, path)
    msg = str(e.value)
    assert "head/kernel: checkpoint has shape (32, 5), model expects (32, 7)" in msg
    assert "head/bias: checkpoint has shape (5,), model expects (7,)" in msg
    new, report = ckpt_import.load_into(target, path, dont_load=[r"head/.*"])
    assert sorted(report["kept_init"]) == ["head/bias", "head/kernel"]
    assert report["not_loaded"] == ["head/bias", "head/kernel"]
    assert new["head"]["kernel"] is target["head"]["kernel"]


def test_missing_params_suggest_dont_load(tmp_path):
    _, gap = make(pool_type="gap")
    path = save(tmp_path, to_big_vision(randomised(gap)))
    _, target = make(pool_type="map")
    with pytest.raises(ValueError, match=r"dont_load") as e:
        ckpt_import.load_into(target, path)
    n_map = len(tree.flatten(target["map"]))
    assert f"not found in checkpoint ({n_map}): ['map/" in str(e.value)
    new, report = ckpt_import.load_into(target, path, dont_load=[r"map/.*"])
    assert new["map"]["probe"] is target["map"]["probe"]
    assert report["num_kept_init"] == n_map and report["num_loaded"] == len(tree.flatten(gap))


def test_pickled_and_malformed_files_are_refused(tmp_path):
    marker = tmp_path / "unpickled"

    class Sneaky:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # would run if the file were unpickled

    path = str(tmp_path / "evil.npz")
    np.savez(path, kernel=np.zeros(3), evil=np.array([Sneaky()], dtype=object))
    with pytest.raises(ValueError, match=r"'evil'.*refused"):
        bv_import.read_npz(path)
    with pytest.raises(ValueError, match=r"refused"):
        ckpt_import.load_into({"kernel": np.zeros(3)}, path)
    assert not marker.exists()

    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        bv_import.read_npz(str(text))
    good = save(tmp_path, {"a": np.arange(1000.0)}, "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        bv_import.read_npz(str(truncated))
