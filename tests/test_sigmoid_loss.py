"""SigLIP sigmoid loss: the dense loss against numpy, and the chunked (ring / all-gather) losses against the dense
one, forward and gradients, on 8 fake CPU devices, as the train loop calls them (jitted inside `jax.set_mesh`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transfer import sharding
from transfer import sigmoid_loss as sl

N, K, D, HEADS = 32, 4, 16, 4


def _np_sigmoid_loss(logits: np.ndarray) -> float:
    """-(1/N) sum_ij log sigmoid(label_ij z_ij) in float64, written from the definition."""
    z = np.asarray(logits, np.float64)
    labels = 2.0 * np.eye(len(z)) - 1.0
    return float(np.sum(np.log1p(np.exp(-labels * z))) / len(z))


def llip_pair_logits(params, img, txt):
    """A Llip-like similarity: each text queries the K tokens of each image (HEADS heads, learnt temperature);
    the per-pair mixture, L2-normalised, is dotted with the text. img [Bi, K, D], txt [Bt, D] -> [Bi, Bt]."""
    q = (txt @ params["wq"]).reshape(txt.shape[0], HEADS, D // HEADS)
    keys = img.reshape(*img.shape[:2], HEADS, D // HEADS)
    scores = jnp.einsum("thd,ikhd->ithk", q, keys) * jnp.exp(params["log_inv_tau"])
    mixed = jnp.einsum("ithk,ikhd->ithd", jax.nn.softmax(scores, axis=-1), keys)
    mixed = mixed.reshape(img.shape[0], txt.shape[0], D)
    mixed = mixed / jnp.linalg.norm(mixed, axis=-1, keepdims=True)
    return jnp.einsum("itd,td->it", mixed, txt)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return {
        "img": _unit(rng.normal(size=(N, D))),
        "tokens": _unit(rng.normal(size=(N, K, D))),
        "txt": _unit(rng.normal(size=(N, D))),
        "t": np.float32(np.log(10.0)),
        "b": np.float32(-2.0),
        "llip": {
            "wq": (rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32),
            "log_inv_tau": np.float32(np.log(5.0)),
        },
    }


def _loss_and_grads(mode, pair, batch_axes=None):
    """jit(value_and_grad) w.r.t. img, txt, t, b and pair_params (the Llip weights, or None)."""
    pair_logits = llip_pair_logits if pair == "llip" else None

    def loss(img, txt, t, b, pair_params):
        return sl.chunked_sigmoid_loss(
            img,
            txt,
            t,
            b,
            pair_logits=pair_logits,
            pair_params=pair_params,
            batch_axes=batch_axes,
            mode=mode,
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def _args(inputs, pair):
    if pair == "llip":
        return inputs["tokens"], inputs["txt"], inputs["t"], inputs["b"], inputs["llip"]
    return inputs["img"], inputs["txt"], inputs["t"], inputs["b"], None


@pytest.fixture(scope="module")
def dense_reference(inputs):
    """Loss and gradients of the dense [N, N] loss on one device (no mesh), per similarity."""
    return {pair: _loss_and_grads("dense", pair)(*_args(inputs, pair)) for pair in ("dot", "llip")}


def test_sigmoid_loss_matches_numpy():
    logits = np.random.default_rng(1).normal(scale=6.0, size=(7, 7)).astype(np.float32)
    np.testing.assert_allclose(float(sl.sigmoid_loss(logits)), _np_sigmoid_loss(logits), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        sl.sigmoid_loss(jnp.zeros((3, 4)))


def test_outside_a_mesh_is_the_dense_loss(inputs):
    """No mesh context: every mode is exp(t) * img @ txt.T + b fed to the loss (numpy float64 reference)."""
    logits = np.exp(np.float64(inputs["t"])) * (
        inputs["img"].astype(np.float64) @ inputs["txt"].T.astype(np.float64)
    ) + float(inputs["b"])
    expected = _np_sigmoid_loss(logits)
    for mode in sl.MODES:
        got = sl.chunked_sigmoid_loss(
            inputs["img"], inputs["txt"], inputs["t"], inputs["b"], mode=mode
        )
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)


CASES = [
    # (mesh, batch_axes, mode, similarity)
    ([("data", 8)], None, "ring", "dot"),
    ([("data", 8)], None, "allgather", "dot"),
    ([("data", 2), ("fsdp", 4)], None, "ring", "dot"),
    ([("data", 2), ("fsdp", 4)], None, "allgather", "dot"),
    ([("data", 2), ("fsdp", 4)], ("data",), "ring", "dot"),  # Batch over one axis of a 2-D mesh.
    ([("data", 8)], None, "ring", "llip"),
    ([("data", 2), ("fsdp", 4)], None, "ring", "llip"),
    ([("data", 2), ("fsdp", 4)], None, "allgather", "llip"),
]


@pytest.mark.parametrize("mesh_cfg,batch_axes,mode,pair", CASES)
def test_chunked_equals_dense_forward_and_gradients(
    inputs, dense_reference, mesh_cfg, batch_axes, mode, pair
):
    mesh = sharding.make_mesh(mesh_cfg)
    axes = sharding.batch_axes(mesh, batch_axes)
    batch = NamedSharding(mesh, P(axes))
    img, txt, t, b, pair_params = _args(inputs, pair)
    with jax.set_mesh(mesh):  # As the train loop runs the step.
        img, txt = jax.device_put(img, batch), jax.device_put(txt, batch)
        loss, grads = _loss_and_grads(mode, pair, batch_axes)(img, txt, t, b, pair_params)
    ref_loss, ref_grads = dense_reference[pair]
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    names = ["img", "txt", "t", "b", "pair_params"]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6, err_msg=name
            )
    if pair == "llip":  # The mixing weights do receive a gradient (not silently zero).
        assert np.abs(np.asarray(grads[4]["wq"])).max() > 1e-4


@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_closed_over_weights_get_the_dense_gradient(inputs, dense_reference, mode):
    """Llip weights captured by a lambda instead of passed as pair_params still get the dense gradient."""
    mesh = sharding.make_mesh([("data", 8)])
    batch = NamedSharding(mesh, P(("data",)))

    def loss(weights, img, txt):
        return sl.chunked_sigmoid_loss(
            img,
            txt,
            inputs["t"],
            inputs["b"],
            pair_logits=lambda _, i, x: llip_pair_logits(weights, i, x),
            mode=mode,
        )

    with jax.set_mesh(mesh):
        img, txt = jax.device_put(inputs["tokens"], batch), jax.device_put(inputs["txt"], batch)
        got = jax.jit(jax.grad(loss))(inputs["llip"], img, txt)
    want = dense_reference["llip"][1][4]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6)


def test_ring_memory_grows_with_the_local_batch_not_the_global_one():
    """Compiled per-device temporaries of loss + gradient at a fixed local batch of 128 on 2 and on 8 devices: the
    ring's stay the same (one [Bi, Bt] block at a time), the all-gather's [Bi, N] rows grow with N."""
    local, d = 128, 16

    def temp_bytes(mode, devices):
        mesh = sharding.make_mesh([("data", devices)], jax.devices()[:devices])
        spec = jax.ShapeDtypeStruct(
            (local * devices, d), jnp.float32, sharding=NamedSharding(mesh, P(("data",)))
        )
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        fn = jax.grad(
            lambda i, x, t, b: sl.chunked_sigmoid_loss(i, x, t, b, mode=mode), argnums=(0, 1, 2, 3)
        )
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(spec, spec, scalar, scalar).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ring_2, ring_8 = temp_bytes("ring", 2), temp_bytes("ring", 8)
    gather_2, gather_8 = temp_bytes("allgather", 2), temp_bytes("allgather", 8)
    assert ring_8 <= 1.1 * ring_2, (ring_2, ring_8)
    assert gather_8 >= 3 * gather_2, (gather_2, gather_8)
    assert ring_8 < local * local * 8 * 4 / 2  # Well under the all-gather's [Bi, N] float32 rows.


def test_bad_input_errors(inputs):
    img, txt, t, b = inputs["img"], inputs["txt"], inputs["t"], inputs["b"]
    with pytest.raises(ValueError, match="mode="):
        sl.chunked_sigmoid_loss(img, txt, t, b, mode="rings")
    with pytest.raises(ValueError, match="same N pairs"):
        sl.chunked_sigmoid_loss(img, txt[:-1], t, b)
    with pytest.raises(ValueError, match="pair_logits="):
        sl.chunked_sigmoid_loss(inputs["tokens"], txt, t, b)
    with jax.set_mesh(sharding.make_mesh([("data", 8)])):
        with pytest.raises(ValueError, match="not divisible by the 8 shards"):
            sl.chunked_sigmoid_loss(img[:12], txt[:12], t, b)
        with pytest.raises(ValueError, match="not axes of the mesh"):
            sl.chunked_sigmoid_loss(img, txt, t, b, batch_axes=("batch",))
