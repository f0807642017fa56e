"""big_vision's own files load through our documented paths and compute what big_vision computed.

tests/fixtures/big_vision/ holds tiny models built, saved and run by big_vision's code (its README says how):
the ViT pool types, CapPa with and without decoder biases, and a SigLIP two-tower file. Each goes through the
path a user takes (the task's `model_load.loader` via the engine's `load_model_init`, or `features.load_tower`
for probes), in scanned and unscanned models, and must reproduce big_vision's outputs within 1e-4 relative.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pretrain import cappa, features, vit
from transfer import train
from transfer.checkpoint import CheckpointMismatchError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "big_vision")
VITS = ("vit_gap", "vit_map", "vit_tok", "vit_sincos2d")
TOL = 1e-4


def _files(name: str) -> tuple[str, dict, dict]:
    """(checkpoint path, io arrays, meta) of one fixture."""
    with np.load(os.path.join(HERE, f"{name}_io.npz"), allow_pickle=False) as f:
        io = {k: f[k] for k in f.files}
    return os.path.join(HERE, f"{name}.npz"), io, json.loads(str(io.pop("meta")))


def _close(ours, ref) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < TOL, rel


def _vit_cfg(m: dict, scan: bool) -> dict:
    """big_vision ViT fields -> our ViT config keys."""
    return dict(
        width=m["width"],
        depth=m["depth"],
        mlp_dim=m["mlp_dim"],
        num_heads=m["num_heads"],
        patch_size=tuple(m["patch_size"]) if "patch_size" in m else tuple(m["patches"]),
        posemb=m.get("posemb", m.get("posemb_type")),
        scan=scan,
        cls_posemb=False,
    )


def _tower_out(tower: features.Tower, image: np.ndarray) -> dict:
    return jax.jit(vit.ViT(**tower.vit_kw).apply)({"params": tower.params}, image)[1]


def _init_and_load(config: ml_collections.ConfigDict, task, batch: dict, path: str):
    """The engine's model_init of a file: the task's loader with the config's model_load keys."""
    config.model_init = path
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), batch)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # the loader fills them in
    loaded, counts = train.load_model_init(config, params, None)
    return loaded, counts


# ------------------------------------------------------------------------------------------------ ViT
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", VITS)
def test_classifier_reproduces_big_vision(name, scan):
    from tasks import classify

    path, io, meta = _files(name)
    m = meta["model_all_fields"]
    model = dict(_vit_cfg(m, scan), pool_type=m["pool_type"])
    config = train.prepare_config(
        ml_collections.ConfigDict(
            dict(
                task="classify",
                num_classes=m["num_classes"],
                model=model,
                model_load=dict(dst_subtree="img"),  # the documented way to load a big_vision tower
            )
        )
    )[0]
    task = classify.Task(config)
    params, counts = _init_and_load(config, task, {"image": io["image"]}, path)
    assert counts["model_init/num_loaded"] == len(jax.tree.leaves(params))
    logits, aux = jax.jit(task.model.apply)({"params": params}, io["image"])
    _close(logits, io["out/logits"])  # the big_vision head landed in our head, not left at init
    _close(aux["pre_logits"], io["out/pre_logits"])
    _close(aux["encoded"], io["out/encoded"])


@pytest.mark.parametrize("name", VITS)
def test_probe_tower_reproduces_big_vision(name):
    path, io, meta = _files(name)
    m = meta["model_all_fields"]
    model = dict(_vit_cfg(m, False), pool_type=m["pool_type"], image_size=32)
    tower = features.load_tower(
        path, model=model
    )  # the probe path; the file's head is not a feature
    aux = _tower_out(tower, io["image"])
    _close(aux["pre_logits"], io["out/pre_logits"])
    _close(aux["encoded"], io["out/encoded"])


def test_head_of_another_size_is_an_error_naming_the_fix():
    from tasks import classify

    path, io, meta = _files("vit_gap")
    model = dict(_vit_cfg(meta["model_all_fields"], False), pool_type="gap")
    base = dict(task="classify", num_classes=3, model=model, model_load=dict(dst_subtree="img"))
    config = train.prepare_config(ml_collections.ConfigDict(base))[0]
    with pytest.raises(CheckpointMismatchError, match=r"head/kernel.*\(64, 10\).*\(64, 3\)"):
        _init_and_load(config, classify.Task(config), {"image": io["image"]}, path)
    base["model_load"]["dont_load"] = [
        "head/.*"
    ]  # a new head: kept at init, the file's head unused
    config = train.prepare_config(ml_collections.ConfigDict(base))[0]
    _, counts = _init_and_load(config, classify.Task(config), {"image": io["image"]}, path)
    assert counts["model_init/num_kept_init"] == 2


# ------------------------------------------------------------------------------------------------ CapPa
def _cappa_config(meta: dict, scan: bool, **txt) -> ml_collections.ConfigDict:
    m = meta["model_all_fields"]
    enc = dict(_vit_cfg(dict(m, width=m["emb_dim"], depth=m["num_layers"]), scan), pool_type="none")
    dec = dict(
        vocab_size=m["vocab_size"],
        depth=m["decoder_num_layers"],
        max_len=m["seq_len"],
        mlp_dim=m["decoder_mlp_dim"] or m["mlp_dim"],
        use_bias=m["decoder_bias"],
        scan=scan,
        **txt,
    )
    base = dict(task="pretrain.cappa_task", model=dict(img=enc, txt=dec))
    return train.prepare_config(ml_collections.ConfigDict(base))[0]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", ["cappa_bias", "cappa_nobias"])
def test_cappa_task_reproduces_big_vision(name, scan):
    from pretrain import cappa_task

    path, io, meta = _files(name)
    # big_vision's final decoder LayerNorm always has a bias, even with decoder_bias=False.
    config = _cappa_config(meta, scan, norm_final_bias=True)
    task = cappa_task.Task(config)
    batch = {"image": io["image"], "labels": io["text"]}
    params, _ = _init_and_load(config, task, batch, path)
    apply = jax.jit(task.model.apply, static_argnames="method")
    encoded, _ = apply({"params": params}, io["image"], method=cappa.Model.encode)
    _close(encoded, io["encoded"])
    cap_in = cappa.shift_right(jnp.asarray(io["text"]))
    np.testing.assert_array_equal(cap_in, io["cap_inputs"])
    t = io["text"].shape[1]
    cap, _ = apply({"params": params}, io["image"], cap_in, cappa.causal_mask(t))
    _close(cap, io["cap_logits"])
    pa_in = jnp.full_like(cap_in, task.mask_id)
    np.testing.assert_array_equal(pa_in, io["pa_inputs"])
    pa, _ = apply({"params": params}, io["image"], pa_in, None)  # full attention
    _close(pa, io["pa_logits"])


def test_cappa_without_final_norm_bias_is_refused_by_name():
    """The paper's decoder_bias=False file into a decoder whose final norm has no bias: an error naming the
    unused array and the config key that fixes it (it once loaded silently and gave logits off by 8e-2)."""
    from pretrain import cappa_task

    path, io, meta = _files("cappa_nobias")
    config = _cappa_config(meta, False)
    task = cappa_task.Task(config)
    batch = {"image": io["image"], "labels": io["text"]}
    with pytest.raises(
        CheckpointMismatchError, match=r"decoder/LayerNorm/bias.*norm_final_bias=True"
    ):
        _init_and_load(config, task, batch, path)
    config.model_load.skip = [
        "decoder/LayerNorm/bias"
    ]  # skipped on purpose: loads, and is reported
    _, counts = _init_and_load(config, task, batch, path)
    assert counts["model_init/num_skipped"] == 1


@pytest.mark.parametrize("prefix", ["", "img", "encoder"])
def test_probe_tower_of_a_cappa_file(prefix):
    """`cappa probe --npz_prefix img` (as README says) or `encoder` (big_vision's name) or nothing."""
    path, io, meta = _files("cappa_bias")
    m = meta["model_all_fields"]
    model = dict(
        _vit_cfg(dict(m, width=m["emb_dim"], depth=m["num_layers"]), False),
        pool_type="none",
        image_size=32,
    )
    aux = _tower_out(features.load_tower(path, model=model, npz_prefix=prefix), io["image"])
    _close(aux["encoded"], io["encoded"])


# ------------------------------------------------------------------------------------------------ SigLIP
def _siglip_vit(meta: dict) -> dict:
    img = meta["model_all_fields"]["image"]
    return dict(_vit_cfg(dict(img, mlp_dim=img["mlp_dim"]), False), pool_type="map")


@pytest.mark.parametrize("prefix", ["img", "params/img", ""])
def test_siglip_image_embedding(prefix):
    path, io, meta = _files("siglip")
    tower = features.load_tower(
        path, model=dict(_siglip_vit(meta), image_size=32), npz_prefix=prefix
    )
    aux = _tower_out(tower, io["image"])
    _close(aux["encoded"], io["out/img/encoded"])
    z = np.asarray(aux["pre_logits"], np.float64)
    _close(z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8), io["zimg"])


def test_siglit_task_takes_the_siglip_image_tower():
    """SigLiT's frozen tower from a released SigLIP file (`params/img/...`): its tokens are big_vision's; the
    file's own MAP head is left out by a config rule (SigLiT trains its own head), not silently."""
    from tasks import siglit

    path, io, meta = _files("siglip")
    img = dict(_siglip_vit(meta), pool_type="none")
    base = dict(
        task="tasks.siglit",
        model=dict(img=img, txt=dict(vocab_size=100, max_len=12, depth=1)),
        model_load=dict(src_subtree="img", dst_subtree="img", dont_load=[], skip=[]),
    )
    config = train.prepare_config(ml_collections.ConfigDict(base))[0]
    task = siglit.Task(config)
    batch = {"image": io["image"], "labels": io["text"]}
    with pytest.raises(CheckpointMismatchError, match="MAPHead_0"):
        _init_and_load(config, task, batch, path)
    config.model_load.skip = ["params/img/MAPHead_0/.*"]
    params, counts = _init_and_load(config, task, batch, path)
    with np.load(path) as f:
        assert counts["model_init/num_skipped"] == sum("img/MAPHead_0/" in n for n in f.files) > 0
    tokens = task.model.apply({"params": params}, io["image"], method=lambda m, x: m.img(x)[1])
    _close(tokens["encoded"], io["out/img/encoded"])
