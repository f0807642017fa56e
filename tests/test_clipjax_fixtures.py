"""clip-jax's own files (tests/fixtures/clip_jax/, written by clip-jax 0.0.6: see its README) load into our CapPa
through the CapPa task's loader and compute what clip-jax computed; options we cannot compute are refused by name.

Each variant comes as clip-jax's training output_dir (config.json + an orbax step with item `default`) and as a
msgpack of its boxed parameters (names ending in `/value`). Our model config is written out here from the
variant's description, independently of the loader's own mapping, which must agree with it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pretrain import cappa, ckpt_import
from transfer import train
from transfer.checkpoint import CheckpointMismatchError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_jax")
TOL = 1e-4
# The reproduction's family, as clip-jax's config.json of cappa_keepreg / cappa_dropreg says it.
IMG = dict(
    width=32,
    depth=2,
    mlp_dim=64,
    num_heads=2,
    patch_size=8,
    norm="rmsnorm",
    normformer=True,
    mlp_type="geglu",
    use_bias=False,
    num_registers=4,
    pool_type="none",
    posemb="learn",
)
TXT = dict(
    vocab_size=100,
    depth=2,
    mlp_dim=64,
    max_len=12,
    norm="rmsnorm",
    normformer=True,
    mlp_type="geglu",
    use_bias=False,
    posemb="rope",
)


def _io(name: str) -> dict:
    with np.load(os.path.join(HERE, f"{name}_io.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k != "meta"}


def _config(keep_registers: bool = True, **img) -> ml_collections.ConfigDict:
    model = dict(img=dict(IMG, **img), txt=TXT, keep_registers=keep_registers)
    return train.prepare_config(
        ml_collections.ConfigDict(dict(task="pretrain.cappa_task", model=model))
    )[0]


def _load(config: ml_collections.ConfigDict, path: str, io: dict) -> tuple:
    from pretrain import cappa_task

    task = cappa_task.Task(config)
    batch = {"image": io["pixel_values"], "labels": io["input_ids"]}
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), batch)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    config.model_init = path
    loaded, counts = train.load_model_init(config, params, None)
    return task, loaded, counts


def _close(ours, ref, where=None) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        ours, ref = ours[where], ref[where]
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert rel < TOL, rel


@pytest.mark.parametrize("kind", ["run_dir", "msgpack"])
@pytest.mark.parametrize("name", ["cappa_keepreg", "cappa_dropreg"])
def test_clip_jax_cappa_reproduces_clip_jax(name, kind, tmp_path):
    io = _io(name)
    keep = name == "cappa_keepreg"
    path = os.path.join(HERE, name)
    if kind == "msgpack":  # the parameters file, kept with the run's config.json beside it
        path = str(tmp_path / f"{name}.msgpack")
        shutil.copy(os.path.join(HERE, f"{name}.msgpack"), path)
        shutil.copy(os.path.join(HERE, name, "config.json"), tmp_path)
    task, params, counts = _load(_config(keep_registers=keep), path, io)
    # clip-jax's CLIP scalars are skipped by the task's rule; the config was read and checked.
    assert counts["model_init/num_skipped"] == 2 and counts["model_init/config_checked"] == 1
    apply = jax.jit(task.model.apply, static_argnames="method")
    tokens, aux = apply({"params": params}, io["pixel_values"], method=cappa.Model.encode)
    _close(tokens, io["vision_tokens"])  # what the decoder sees (registers dropped if not kept)
    if not keep:
        _close(aux["encoded"], io["vision_tokens_keep_registers"])
    # Teacher forcing on clip-jax's own ids ([BOS, ..., EOS, PAD...]); its pad rows are meaningless.
    t = io["input_ids"].shape[1]
    logits, _ = apply({"params": params}, io["pixel_values"], io["input_ids"], cappa.causal_mask(t))
    _close(logits, io["logits"], io["attention_mask"] == 1)
    pa_in = jnp.full_like(
        io["input_ids"], task.mask_id
    )  # our [MASK] row = clip-jax's mask token's row
    pa, _ = apply({"params": params}, io["pixel_values"], pa_in, None)
    _close(pa, io["logits_parallel"])


def test_msgpack_alone_loads_and_says_what_it_could_not_check(capsys):
    io = _io("cappa_keepreg")
    task, params, counts = _load(_config(), os.path.join(HERE, "cappa_keepreg.msgpack"), io)
    assert counts["model_init/config_checked"] == 0 and "not checked" in capsys.readouterr().out
    t = io["input_ids"].shape[1]
    logits, _ = jax.jit(task.model.apply)(
        {"params": params}, io["pixel_values"], io["input_ids"], cappa.causal_mask(t)
    )
    _close(logits, io["logits"], io["attention_mask"] == 1)


def test_keep_registers_is_read_from_the_run_and_refused_when_it_differs():
    io = _io("cappa_dropreg")
    path = os.path.join(HERE, "cappa_dropreg")
    with pytest.raises(
        CheckpointMismatchError, match=r"keep_registers=False.*model.keep_registers=False"
    ):
        _load(_config(keep_registers=True), path, io)  # silently loaded once: logits 29 % off


def test_every_other_difference_is_named_with_its_key():
    io = _io("cappa_keepreg")
    with pytest.raises(CheckpointMismatchError) as e:
        _load(_config(num_registers=2, norm="layernorm"), os.path.join(HERE, "cappa_keepreg"), io)
    assert "model.img.num_registers=4" in str(e.value) and "model.img.norm='rmsnorm'" in str(
        e.value
    )


def test_options_we_cannot_compute_are_refused_by_name():
    cfg = json.load(open(os.path.join(HERE, "cappa_preln_layernorm", "config.json")))
    io = _io("cappa_preln_layernorm")
    img = dict(
        width=32,
        num_registers=2,
        norm="layernorm",
        normformer=False,
        mlp_type="gelu",
        use_bias=True,
    )
    config = _config(**img)
    config.model.txt.update(
        width=24, norm="layernorm", normformer=False, mlp_type="gelu", use_bias=True
    )
    config.model.txt.posemb = "learn"
    with pytest.raises(CheckpointMismatchError) as e:
        _load(config, os.path.join(HERE, "cappa_preln_layernorm"), io)
    assert cfg["vision_config"]["normalize_qk"] and "normalize_qk=True" in str(e.value)
    assert "position_embedding_factorized=True" in str(e.value)


def test_directories_that_are_not_runs_get_our_message(tmp_path):
    io = _io("cappa_keepreg")
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(HERE, "cappa_keepreg"), bare)
    os.remove(bare / "config.json")  # an orbax directory of unknown origin
    with pytest.raises(ValueError, match="not a clip-jax run"):
        _load(_config(), str(bare), io)
    with pytest.raises(ValueError, match="not a clip-jax run"):
        ckpt_import.read_flat(str(tmp_path))
