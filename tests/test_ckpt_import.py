"""Tests for pretrain/ckpt_import.py.

Checkpoint files (big_vision CapPa, SigLIP, clip-jax) are written from naming tables spelled out here, not from the
module's own tables, out of randomly valued params of our tiny models; loading them back must give the very same
arrays (bit-exact), and the report/error must name what did not fit.
"""

import os
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from pretrain import cappa, ckpt_import
from pretrain.vit import ViT, scan_to_unscanned, unscanned_to_scan
from transfer import tree
from transfer.checkpoint import CheckpointMismatchError

V, LEN, RES = 10, 6, 16  # vocab, caption length, image side (16 px / patch 8 = a 2x2 grid)

# ---- big_vision names, written out: our module path -> theirs (leaf names kernel/bias/scale are kept).
BV_VIT_BLOCK = {
    "norm_attn_pre": "LayerNorm_0",
    "attn": "MultiHeadDotProductAttention_0",
    "norm_mlp_pre": "LayerNorm_1",
    "mlp/wi": "MlpBlock_0/Dense_0",
    "mlp/wo": "MlpBlock_0/Dense_1",
}
BV_VIT_TOP = {
    "embedding": "embedding",
    "pos_embedding": "pos_embedding",
    "cls": "cls",
    "encoder/norm_final": "Transformer/encoder_norm",
    "map/probe": "MAPHead_0/probe",
    "map/attn": "MAPHead_0/MultiHeadDotProductAttention_0",
    "map/norm": "MAPHead_0/LayerNorm_0",
    "map/mlp/wi": "MAPHead_0/MlpBlock_0/Dense_0",
    "map/mlp/wo": "MAPHead_0/MlpBlock_0/Dense_1",
    "head": "head",
}
BV_DEC_BLOCK = {
    "norm_self_pre": "LayerNorm1",
    "self_attn": "SelfAttn",
    "norm_cross_pre": "LayerNorm2",
    "cross_attn": "CrossAttn",
    "norm_mlp_pre": "LayerNorm3",
    "mlp/wi": "MLP/Dense_0",
    "mlp/wo": "MLP/Dense_1",
}
BV_DEC_TOP = {
    "embedding": "decoder/EmbedTargets",
    "pos_embedding": "pos_embedding_decoder",
    "norm_final": "decoder/LayerNorm",
    "head": "decoder/LogitsDense",
}
# ---- clip-jax names (clip_jax/modeling.py: CLIPModel.vision / .text; layers always scanned on axis 0).
CJ_VIT_BLOCK = {
    "norm_attn_pre": "pre_attention_norm",
    "attn": "attention",
    "norm_attn_post": "post_attention_norm",
    "norm_mlp_pre": "mlp/pre_mlp_norm",
    "mlp/norm_mid": "mlp/mid_mlp_norm",
    "mlp": "mlp",
}
CJ_VIT_TOP = {
    "embedding": "vision/embeddings/patch_embeds",
    "pos_embedding": "vision/embeddings/position_embeds",
    "registers": "vision/embeddings/registers",
    "encoder/norm_final": "vision/final_norm",
}
CJ_DEC_BLOCK = {
    "norm_self_pre": "pre_attention_norm",
    "self_attn": "attention",
    "norm_self_post": "post_attention_norm",
    "norm_cross_pre": "pre_cross_attention_norm",
    "cross_attn": "cross_attention",
    "norm_cross_post": "post_cross_attention_norm",
    "norm_mlp_pre": "mlp/pre_mlp_norm",
    "mlp/norm_mid": "mlp/mid_mlp_norm",
    "mlp": "mlp",
}
CJ_TXT_TOP = {
    "embedding/embedding": "text/embeddings/embeddings/embedding",
    "norm_final": "text/final_norm",
    "head": "text/logits",
}
# clip-jax's force_scale=False: these norms of the text tower have no parameter (scale 1).
CJ_SCALE_FREE = r"txt/(decoder/block_\d+/(norm_self_pre|norm_cross_pre|norm_mlp_pre|mlp/norm_mid)|norm_final)/scale"


def sub(path, table):
    for ours, theirs in table.items():
        if path == ours or path.startswith(ours + "/"):
            return theirs + path[len(ours) :]
    raise KeyError(path)


def write_names(params, towers, axis=None):
    """Our tree -> {file name: array}; ``towers[tower] = (block_name(i, rest), top_name(rest))``.

    ``axis`` None: one entry per layer; else the layers of each block parameter stacked on ``axis``.
    """
    out, stacks = {}, {}
    for path, value in tree.flatten(params).items():
        tower, rest = path.split("/", 1)
        block_name, top_name = towers[tower]
        m = re.fullmatch(r"(?:encoder|decoder)/block_(\d+)/(.+)", rest)
        if m is None:
            out[top_name(rest)] = np.asarray(value)
        elif axis is None:
            out[block_name(m[1], m[2])] = np.asarray(value)
        else:
            stacks.setdefault(block_name("", m[2]), {})[int(m[1])] = np.asarray(value)
    for name, layers in stacks.items():
        out[name] = np.stack([layers[i] for i in range(len(layers))], axis=axis)
    return out


def bv_vit_names(prefix=""):
    return (
        lambda i, r: (
            f"{prefix}Transformer/encoderblock{'_' + i if i else ''}/{sub(r, BV_VIT_BLOCK)}"
        ),
        lambda r: prefix + sub(r, BV_VIT_TOP),
    )


def bv_cappa_file(params, scanned):
    """big_vision CapPa: ``encoder/`` = a big_vision ViT (layers on axis 0), decoder layers on axis 1."""
    img = {"img": params["img"]}
    txt = {"txt": params["txt"]}
    dec = (
        lambda i, r: f"decoder/EncDecBlock{i}/{sub(r, BV_DEC_BLOCK)}",
        lambda r: sub(r, BV_DEC_TOP),
    )
    return {
        **write_names(img, {"img": bv_vit_names("encoder/")}, 0 if scanned else None),
        **write_names(txt, {"txt": dec}, 1 if scanned else None),
    }


def clip_jax_tree(params):
    """clip-jax CapPa params as it nests them (text norms without scale, V embedding rows, extra CLIP scalars)."""
    flat = {p: v for p, v in tree.flatten(params).items() if not re.fullmatch(CJ_SCALE_FREE, p)}
    flat["txt/embedding/embedding"] = np.asarray(flat["txt/embedding/embedding"])[:V]
    towers = {
        "img": (
            lambda i, r: f"vision/encoder/layers/{sub(r, CJ_VIT_BLOCK)}",
            lambda r: sub(r, CJ_VIT_TOP),
        ),
        "txt": (
            lambda i, r: f"text/encoder/layers/{sub(r, CJ_DEC_BLOCK)}",
            lambda r: sub(r, CJ_TXT_TOP),
        ),
    }
    names = write_names(tree.unflatten(flat), towers, axis=0)
    names.update(logit_scale=np.ones(1, np.float32), logit_bias=np.zeros(1, np.float32))
    return names


def cfg(family, scan=False):
    img = dict(
        cappa.MODEL_DEFAULTS["img"], width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8
    )
    txt = dict(cappa.MODEL_DEFAULTS["txt"], vocab_size=V, depth=2, max_len=LEN, mlp_dim=48)
    if family == "clip":  # the reproduction's family, as clip-jax trains it
        fam = dict(norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False)
        img.update(fam, num_registers=2)
        txt.update(fam, posemb="rope")
    img["scan"] = txt["scan"] = scan
    return dict(dtype="float32", img=img, txt=txt)


def randomised(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), shapes)


_SHAPES = {}


def cappa_params(family="bv", scan=False, res=RES, seed=0, **txt_kw):
    """Random values in the shapes of ``Model.init(rng, image, tokens)`` (shapes only: nothing is compiled)."""
    c = cfg(family, scan)
    c["txt"].update(txt_kw)
    key = (family, scan, res, tuple(sorted(txt_kw.items())))
    if key not in _SHAPES:
        model = cappa.Model(**cappa.model_kwargs(c))
        image, tokens = jnp.zeros((1, res, res, 3)), jnp.zeros((1, LEN), jnp.int32)
        _SHAPES[key] = jax.eval_shape(model.init, jax.random.key(0), image, tokens)["params"]
    return randomised(_SHAPES[key], seed)


def vit_params(seed=0, **kw):
    model = ViT(**{**dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8), **kw})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, RES, RES, 3)))["params"]
    return randomised(shapes, seed)


def src_unscanned(params):
    return scan_to_unscanned(params) if "blocks" in params.get("encoder", {}) else params


def save_npz(tmp_path, flat, name="ckpt.npz"):
    path = str(tmp_path / name)
    np.savez(path, **flat)
    return path


def assert_same(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        assert np.array_equal(np.asarray(fa[path]), np.asarray(fb[path])), path


@pytest.mark.parametrize("file_scanned", [False, True])
@pytest.mark.parametrize("model_scan", [False, True])
def test_big_vision_cappa_into_cappa(tmp_path, file_scanned, model_scan):
    src = cappa_params("bv")
    flat = bv_cappa_file(src, file_scanned)
    if file_scanned:  # the decoder's layer axis is 1 in big_vision: [E, depth, heads, head_dim]
        assert flat["decoder/EncDecBlock/SelfAttn/query/kernel"].shape == (32, 2, 2, 16)
        assert flat["encoder/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)
    path = save_npz(tmp_path, flat)
    fresh = cappa_params("bv", scan=model_scan, seed=1)
    new, report = ckpt_import.load_into(fresh, path)
    assert_same(new, unscanned_to_scan(src) if model_scan else src)
    assert report["format"] == "big_vision_cappa"
    assert report["num_loaded"] == len(tree.flatten(fresh))
    assert report["skipped"] == report["kept_init"] == report["resampled"] == []


def test_big_vision_cappa_encoder_into_classifier(tmp_path):
    src = cappa_params("bv")
    path = save_npz(tmp_path, bv_cappa_file(src, scanned=False))
    clf = {"img": vit_params(seed=2, pool_type="gap", num_classes=3)}
    with pytest.raises(CheckpointMismatchError, match=r"not found in checkpoint .*img/head/"):
        ckpt_import.load_into(clf, path, dst_prefix="img")  # the file's image tower has no head
    new, report = ckpt_import.load_into(
        clf, path, prefix="encoder", dst_prefix="img", dont_load=["img/head/.*"]
    )
    assert new["img"]["head"]["kernel"] is clf["img"]["head"]["kernel"]
    del new["img"]["head"]
    assert_same(new["img"], src["img"])
    assert report["format"] == "big_vision_vit"
    assert sorted(report["kept_init"]) == ["img/head/bias", "img/head/kernel"]
    assert "decoder/EncDecBlock1/CrossAttn/key/kernel" in report["outside_prefix"]
    assert "pos_embedding_decoder" in report["outside_prefix"]


def test_siglip_image_tower(tmp_path):
    src = cappa_params("bv")
    flat = write_names({"img": src["img"]}, {"img": bv_vit_names("img/")})
    flat.update(
        {"txt/Embed_0/embedding": np.ones((7, 4), np.float32), "t": np.zeros(1, np.float32)}
    )
    path = save_npz(tmp_path, flat)
    fresh = cappa_params("bv", seed=3)
    new, report = ckpt_import.load_into(fresh, path, prefix="img", dst_prefix="img")
    assert_same(new["img"], src["img"])
    assert_same(new["txt"], fresh["txt"])
    assert report["outside_prefix"] == ["t", "txt/Embed_0/embedding"]
    with pytest.raises(CheckpointMismatchError, match=r"not found in checkpoint .*\['txt/"):
        ckpt_import.load_into(fresh, path)  # a whole CapPa from SigLIP: the decoder is not there
    with pytest.raises(CheckpointMismatchError, match=r"does not use: \['t', 'txt/Embed_0/"):
        ckpt_import.load_into(fresh, path, dont_load=["txt/.*"])  # SigLIP's text tower is not ours
    _, report = ckpt_import.load_into(fresh, path, dont_load=["txt/.*"], skip=["t", "txt/.*"])
    assert report["format"] == "siglip" and report["num_kept_init"] == len(
        tree.flatten(fresh["txt"])
    )


@pytest.mark.parametrize("model_scan", [False, True])
@pytest.mark.parametrize("kind", ["msgpack", "npz"])
def test_clip_jax_into_cappa(tmp_path, model_scan, kind):
    src = cappa_params("clip")
    flat = clip_jax_tree(src)
    if kind == "msgpack":
        path = str(tmp_path / "cappa.msgpack")
        with open(path, "wb") as f:  # clip-jax checkpoints hold {"params": ...}
            f.write(flax.serialization.msgpack_serialize({"params": tree.unflatten(flat)}))
    else:
        path = save_npz(tmp_path, flat)
    fresh = cappa_params("clip", scan=model_scan, seed=4)
    new, report = ckpt_import.load_into(fresh, path, mask_token_id=4, skip=[".*logit_(bias|scale)"])
    want = tree.flatten(src)
    for p in want:  # clip-jax's scale-free norms are scale 1; our [MASK] row = its mask token's row
        if re.fullmatch(CJ_SCALE_FREE, p):
            want[p] = np.ones_like(want[p])
    want["txt/embedding/embedding"][V] = want["txt/embedding/embedding"][4]
    want = tree.unflatten(want)
    assert_same(new, unscanned_to_scan(want) if model_scan else want)
    assert report["format"] == "clip_jax"
    assert report["extended"] == ["txt/embedding/embedding"]
    wrapper = "params/" if kind == "msgpack" else ""
    assert report["skipped"] == [wrapper + "logit_bias", wrapper + "logit_scale"]
    assert "txt/norm_final/scale" in report["filled_ones"]
    assert not any(
        p.startswith("img/") for p in report["filled_ones"]
    )  # vision scales were in the file
    if not model_scan:
        assert len(report["filled_ones"]) == 1 + 2 * 4
    # Without mask_token_id the [MASK] row keeps its init; the vision tower alone goes into a ViT.
    new, _ = ckpt_import.load_into(fresh, path, prefix="vision", dst_prefix="img")
    assert_same(new["img"], unscanned_to_scan(want["img"]) if model_scan else want["img"])
    assert_same(new["txt"], fresh["txt"])


def test_posemb_resampled_to_the_model_grid(tmp_path):
    src = cappa_params("bv")
    path = save_npz(tmp_path, bv_cappa_file(src, scanned=False))
    big = cappa_params("bv", res=32, seed=5)  # 4x4 patches instead of 2x2
    new, report = ckpt_import.load_into(big, path)
    assert report["resampled"] == ["img/pos_embedding"]
    got = new["img"]["pos_embedding"]
    assert got.shape == (1, 16, 32)
    want = scipy.ndimage.zoom(
        np.asarray(src["img"]["pos_embedding"]).reshape(2, 2, 32), (2, 2, 1), order=1
    )
    np.testing.assert_allclose(got, want.reshape(1, 16, 32), rtol=1e-5, atol=1e-6)
    assert np.array_equal(new["txt"]["pos_embedding"], src["txt"]["pos_embedding"])


def test_shape_mismatch_names_paths_and_the_fix(tmp_path):
    path = save_npz(tmp_path, bv_cappa_file(cappa_params("bv"), scanned=False))
    other = cappa_params("bv", seed=6, vocab_size=V + 2, max_len=LEN + 2)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt_import.load_into(other, path)
    msg = str(e.value)
    assert "txt/head/kernel: checkpoint has shape (32, 10), model expects (32, 12)" in msg
    assert "txt/embedding/embedding: checkpoint has shape (11, 32), model expects (13, 32)" in msg
    assert "txt/pos_embedding: checkpoint has shape (1, 6, 32), model expects (1, 8, 32)" in msg
    assert "max_len to 6" in msg and "dont_load" in msg
    new, report = ckpt_import.load_into(
        other, path, dont_load=["txt/(head/.*|embedding/.*|pos_embedding)"]
    )
    assert (
        report["num_kept_init"] == 4 and new["txt"]["head"]["bias"] is other["txt"]["head"]["bias"]
    )


def test_pickles_and_unknown_files_are_refused(tmp_path):
    marker = tmp_path / "unpickled"

    class Sneaky:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # runs only if the file is unpickled

    path = str(tmp_path / "evil.npz")
    np.savez(path, embedding=np.zeros(3), evil=np.array([Sneaky()], dtype=object))
    with pytest.raises(ValueError, match=r"'evil'.*refused"):
        ckpt_import.load_into({"embedding": np.zeros(3)}, path)
    assert not marker.exists()
    junk = tmp_path / "notes.msgpack"
    junk.write_bytes(b"\xc1 not a checkpoint")
    with pytest.raises(ValueError, match=r"neither an \.npz file nor a flax msgpack"):
        ckpt_import.load_into({"a": np.zeros(3)}, str(junk))
    odd = save_npz(tmp_path, {"foo/bar": np.zeros(2)}, "odd.npz")
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint format.*\['foo'\]"):
        ckpt_import.load_into({"a": np.zeros(3)}, odd)


@pytest.mark.parametrize("scan", [False, True])
def test_export_round_trip(tmp_path, scan):
    src = vit_params(seed=7, pool_type="map", num_classes=3, scan=scan)
    path = str(tmp_path / "vit.npz")
    names = ckpt_import.export_vision_tower({"img": src, "txt": {}}, path)
    expected = write_names(
        {"img": src_unscanned(src)}, {"img": bv_vit_names()}, 0 if scan else None
    )
    assert names == sorted(expected)
    with np.load(path, allow_pickle=False) as npz:
        for k in names:
            assert np.array_equal(npz[k], expected[k]), k
    if scan:
        assert expected["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 32, 64)
    fresh = vit_params(seed=8, pool_type="map", num_classes=3, scan=scan)
    new, report = ckpt_import.load_into(fresh, path)
    assert_same(new, src)
    assert report["num_loaded"] == len(tree.flatten(src)) and report["skipped"] == []


def test_export_refuses_what_big_vision_cannot_name(tmp_path):
    with pytest.raises(ValueError, match=r"no parameter for .*norm_attn_post/scale") as e:
        ckpt_import.export_vision_tower(cappa_params("clip"), str(tmp_path / "x.npz"))
    assert "'registers'" in str(e.value) and "mlp/wi_0/kernel" in str(e.value)
    assert "'encoder/norm_final/scale'" in str(e.value)  # RMSNorm: no bias, not a LayerNorm
    with pytest.raises(ValueError, match=r"unknown export format"):
        ckpt_import.export_vision_tower(cappa_params("bv"), str(tmp_path / "x.npz"), fmt="onnx")
