"""Attention maps: captured weights equal a numpy recomputation; register/cross maps pick the right entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain import attention, cappa, vit

VOCAB, MAX_LEN, REG = 20, 6, 2


def make_model(scan: bool):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cappa.MODEL_DEFAULTS.items()}
    cfg["img"].update(
        width=16,
        depth=2,
        num_heads=2,
        patch_size=4,
        num_registers=REG,
        norm="rmsnorm",
        use_bias=False,
        scan=scan,
    )
    cfg["txt"].update(vocab_size=VOCAB, depth=2, max_len=MAX_LEN, scan=scan)
    return cappa.Model(**cappa.model_kwargs(cfg))


@pytest.fixture(scope="module")
def setup():
    model = make_model(scan=False)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
    tokens = jnp.asarray(rng.integers(2, VOCAB, (2, MAX_LEN)).astype(np.int32))
    params = model.init(jax.random.key(0), images, tokens)["params"]
    return model, params, images, tokens


def _rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def test_first_encoder_layer_matches_numpy(setup):
    model, params, images, tokens = setup
    maps = attention.capture(model, params, images, tokens)
    p = jax.tree.map(np.asarray, params["img"])
    x = np.asarray(images).reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    x = x @ p["embedding"]["kernel"].reshape(48, 16) + p["pos_embedding"]
    x = np.concatenate([x, np.broadcast_to(p["registers"], (2, REG, 16))], 1)
    block = p["encoder"]["block_0"]
    y = _rms(x, block["norm_attn_pre"]["scale"])
    q = np.einsum("bnd,dhk->bhnk", y, block["attn"]["query"]["kernel"])
    k = np.einsum("bnd,dhk->bhnk", y, block["attn"]["key"]["kernel"])
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps["encoder"][0], probs, atol=1e-5)
    assert len(maps["encoder"]) == 2 and len(maps["cross"]) == 2
    cross = np.asarray(maps["cross"][1])
    assert cross.shape == (2, 2, MAX_LEN, 4 + REG)  # [B, heads, tokens, patches + registers]
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)


def test_scanned_model_gives_the_same_maps(setup):
    model, params, images, tokens = setup
    scanned = make_model(scan=True)
    sparams = vit.unscanned_to_scan(params)
    a = attention.capture(model, params, images, tokens)
    b = attention.capture(scanned, sparams, images, tokens)
    for key in ("encoder", "cross"):
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_register_and_cross_maps_pick_the_right_entries():
    n, b, h = 4, 1, 2
    attn = np.random.default_rng(1).random((b, h, n + REG, n + REG)).astype(np.float32)
    maps = attention.register_maps(jnp.asarray(attn), (2, 2), REG)
    mean = attn.mean(1)
    for r in range(REG):
        np.testing.assert_allclose(
            maps["from_register"][0, r].ravel(), mean[0, n + r, :n], rtol=1e-6
        )
        np.testing.assert_allclose(maps["to_register"][0, r].ravel(), mean[0, :n, n + r], rtol=1e-6)
    cross = np.random.default_rng(2).random((b, h, 3, n + REG)).astype(np.float32)
    cm = attention.cross_maps(jnp.asarray(cross), (2, 2))
    np.testing.assert_allclose(cm[0, 2].ravel(), cross.mean(1)[0, 2, :n], rtol=1e-6)


def test_caption_commands_refuse_a_run_that_is_not_a_captioner(tiny_config):
    from pretrain import runs
    from tasks import classify

    run = runs.LoadedRun(
        workdir="some/run",
        step=1,
        config=tiny_config,
        task=classify.Task(tiny_config),
        params={},
        tokenizer=None,
    )
    with pytest.raises(ValueError, match="'some/run' is a 'classify' run, not a CapPa captioner"):
        runs.require_captioner(run)
