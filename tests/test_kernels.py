"""`model.kernels` (pretrain/linear.py): "xla" and "cpu" give the same parameters, values and gradients;
"auto" is "cpu" on CPU; forward-mode autodiff works under "xla"; the barrier follows config.batch_axes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pretrain import attention, cappa, linear, text_encoder, vit
from transfer import sharding, train

VOCAB, LEN, PAD = 11, 6, 0
# Compute dtype -> (rtol, atol as a fraction of the largest reference magnitude).
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (3e-2, 3e-2)}


def _cappa_cfg(kernels: str, dtype: str, scan: bool, remat: str, family: str) -> dict:
    depth = 2 if scan else 1  # a looped layer compiles once per layer, a scanned stack once
    img = dict(
        vit.TOWER_DEFAULTS, pool_type="none", width=32, depth=depth, num_heads=2, patch_size=8
    )
    txt = dict(cappa.MODEL_DEFAULTS["txt"], vocab_size=VOCAB, depth=depth, max_len=LEN)
    if family == "cappa":  # the reproduction's blocks, registers and rotary positions
        blocks = dict(norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False)
        img.update(blocks, num_registers=2)
        txt.update(blocks, posemb="rope")
    for tower in (img, txt):
        tower.update(scan=scan, remat_policy=remat)
    return dict(dtype=dtype, kernels=kernels, img=img, txt=txt)


@functools.cache
def _cappa(kernels: str, dtype="float32", scan=False, remat="none", family="bv") -> cappa.Model:
    return cappa.Model(**cappa.model_kwargs(_cappa_cfg(kernels, dtype, scan, remat, family)))


def _random_params(model, *args, seed=0):
    """Random values in the model's parameter tree (numpy: nothing to compile). Unlike the init, no
    zero head kernel, so every parameter gets a gradient."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]

    def one(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


@functools.cache
def _batch():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    labels = rng.integers(2, VOCAB, (4, LEN)).astype(np.int32)
    labels[:, 4:] = PAD  # padding
    labels[1, 2:] = PAD
    is_pa = jnp.asarray(
        [False, True, False, True]
    )  # Cap rows are causal, Pa rows attend everywhere
    tokens, mask = cappa.decoder_inputs(jnp.asarray(labels), is_pa, VOCAB)
    return image, tokens, mask, jnp.asarray(labels)


def _loss(model: cappa.Model, with_logits: bool = False):
    def loss(params, image):
        _, tokens, mask, labels = _batch()
        logits, _ = model.apply({"params": params}, image, tokens, mask)
        value = jnp.mean(cappa.sequence_xent(logits, labels, PAD)[0])
        return (value, logits) if with_logits else value

    return loss


@functools.cache
def _run(kernels, dtype="float32", scan=False, remat="none", family="bv"):
    """((loss, logits), (param grads, image grad)) of one setting, jitted once."""
    loss = _loss(_cappa(kernels, dtype, scan, remat, family), with_logits=True)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return step(_params(family, scan), _batch()[0])


@functools.cache
def _params(family="bv", scan=False):
    return _random_params(_cappa("cpu", family=family, scan=scan), *_batch()[:3])


def _close(got, want, dtype):
    """Leaf by leaf, atol relative to the leaf's largest magnitude, or 1 % of the tree's: some gradients
    are zero up to rounding (attention's key bias: softmax is shift invariant)."""
    rtol, atol = TOL[dtype]
    pairs = [
        (p, np.asarray(a, np.float32), np.asarray(b, np.float32)) for p, a, b in _pairs(got, want)
    ]
    tree_max = max(float(np.max(np.abs(b))) for _, _, b in pairs)
    for path, a, b in pairs:
        assert a.shape == b.shape, path
        scale = max(float(np.max(np.abs(b))), 0.01 * tree_max)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=path)


def _pairs(got, want):
    flat = lambda t: {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    return [(k, g[k], w[k]) for k in w]


def test_auto_is_cpu_on_cpu_and_xla_elsewhere(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert linear.resolve("auto") == "cpu" and linear.ops("auto") is linear.ops("cpu")
    assert linear.resolve("xla") == "xla" and linear.ops("xla").name == "xla"
    with pytest.raises(ValueError, match="kernels = 'gpu'"):
        linear.resolve("gpu")
    with pytest.raises(
        ValueError, match="kernels"
    ):  # a config typo fails when the kwargs are built
        cappa.model_kwargs(dict(_cappa_cfg("fast", "float32", False, "none", "bv")))
    # The devices in use decide: a CPU mesh in context is CPU whatever the default backend says.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert linear.resolve("auto") == "xla"
    with jax.set_mesh(sharding.make_mesh([("data", -1)])):
        assert linear.resolve("auto") == "cpu"
        assert jax.jit(lambda: jnp.float32(linear.resolve("auto") == "cpu"))() == 1.0


def test_every_task_config_has_the_knob():
    """One key per model (`model.kernels`, like `model.dtype`), reaching every tower and head."""
    from pretrain import cappa_task, features
    from tasks import classify, linear_probe, siglit

    for defaults in (
        cappa_task.DEFAULTS,
        siglit.DEFAULTS,
        classify.DEFAULTS,
        linear_probe.DEFAULTS,
    ):
        assert defaults["model"]["kernels"] == "auto"
    assert (
        "kernels" not in cappa.MODEL_DEFAULTS["img"]
        and "kernels" not in siglit.DEFAULTS["model"]["img"]
    )
    kw = cappa.model_kwargs(_cappa_cfg("xla", "float32", False, "none", "bv"))
    assert kw["img_kw"]["kernels"] == kw["txt_kw"]["kernels"] == "xla"
    config = ml_collections.ConfigDict(siglit.DEFAULTS)
    config.model.kernels = "xla"
    kw = siglit.model_kwargs(config)
    assert kw["img_kw"]["kernels"] == kw["txt_kw"]["kernels"] == kw["head_kw"]["kernels"] == "xla"
    assert classify.vit_kwargs(dict(classify.DEFAULTS["model"], kernels="xla"))["kernels"] == "xla"
    run_config = {"model": _cappa_cfg("xla", "float32", False, "none", "bv")}
    assert features.vit_kwargs(run_config)["kernels"] == "xla"  # a CapPa run's tower for probes
    assert (
        features.vit_kwargs({"model": {"img": {}}})["kernels"] == "auto"
    )  # runs saved before the knob


def test_auto_traces_exactly_the_cpu_program_and_xla_has_no_custom_vjp():
    image = _batch()[0]
    jaxpr = {
        k: str(jax.make_jaxpr(jax.grad(_loss(_cappa(k))))(_params(), image))
        for k in ("auto", "cpu")
    }
    assert jaxpr["auto"] == jaxpr["cpu"] and " cond[" in jaxpr["cpu"]  # the barrier
    forward = {k: str(jax.make_jaxpr(_loss(_cappa(k)))(_params(), image)) for k in ("cpu", "xla")}
    assert "custom_vjp_call" in forward["cpu"]
    assert "custom_vjp_call" not in forward["xla"]  # so no barrier, and jax.jvp works


def test_parameter_trees_are_identical_across_settings():
    """Paths, shapes and dtypes (the modules own every parameter; the kernels create none)."""
    image, tokens, mask, _ = _batch()
    init = lambda model, *args: jax.eval_shape(model.init, jax.random.key(3), *args)["params"]
    heads = dict(pool_type="map", num_classes=5, width=16, depth=1, num_heads=2, patch_size=8)
    enc = dict(
        vocab_size=VOCAB, embed_dim=8, width=16, depth=1, num_heads=2, max_len=LEN, pool="map"
    )
    for make, args in (
        (lambda k: _cappa(k, family="cappa"), (image, tokens, mask)),
        (lambda k: _cappa(k, scan=True), (image, tokens, mask)),
        (lambda k: vit.ViT(**heads, kernels=k), (image,)),
        (lambda k: text_encoder.TextEncoder(**enc, kernels=k), (tokens,)),
    ):
        trees = [init(make(k), *args) for k in linear.KERNELS]
        assert trees[0] == trees[1] == trees[2]
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(trees[0]))
    assert {"map", "head"} <= set(trees[0]) or {"map", "proj"} <= set(trees[0])


@pytest.mark.parametrize(
    "dtype, scan, remat, family",
    [
        ("float32", False, "none", "bv"),
        ("float32", True, "nothing_saveable", "cappa"),
        ("bfloat16", False, "dots_saveable", "cappa"),
    ],
)
def test_cappa_values_and_gradients_are_equal(dtype, scan, remat, family):
    """Both towers, Cap (causal) and Pa (full) rows, padded captions; gradients of params and image."""
    (loss_cpu, logits_cpu), grads_cpu = _run("cpu", dtype, scan, remat, family)
    (loss_xla, logits_xla), grads_xla = _run("xla", dtype, scan, remat, family)
    np.testing.assert_allclose(loss_xla, loss_cpu, rtol=TOL[dtype][0])
    _close(logits_xla, logits_cpu, dtype)
    _close(grads_xla, grads_cpu, dtype)
    assert float(jnp.max(jnp.abs(grads_cpu[0]["img"]["embedding"]["kernel"]))) > 0
    assert float(jnp.max(jnp.abs(grads_cpu[1]))) > 0  # the image gradient


def _value_and_grad(model, params, x):
    def loss(p):
        out = model.apply({"params": p}, x)
        return jnp.sum(jnp.sin(out[0] if isinstance(out, tuple) else out))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_padding_masks_map_heads_and_vit_head_are_equal():
    """A text encoder (pad keys hidden, MAP pooling over real tokens) and a ViT with a MAP head and a
    classifier head, float32 (bf16: the CapPa cases)."""
    tokens = jnp.asarray([[5, 3, 7, 1, 0, 0], [4, 1, 0, 0, 0, 0]], jnp.int32)
    image = _batch()[0][:2]
    kw = dict(
        vocab_size=VOCAB, embed_dim=8, width=16, depth=1, num_heads=2, max_len=LEN, pool="map"
    )
    vkw = dict(pool_type="map", num_classes=5, width=16, depth=1, num_heads=2, patch_size=8)
    for make, x in (
        (lambda k: text_encoder.TextEncoder(**kw, kernels=k), tokens),
        (lambda k: vit.ViT(**vkw, kernels=k, head_zeroinit=False), image),
    ):
        params = _random_params(make("cpu"), x)
        out = {k: _value_and_grad(make(k), params, x) for k in ("cpu", "xla")}
        np.testing.assert_allclose(out["xla"][0], out["cpu"][0], rtol=1e-5)
        _close(out["xla"][1], out["cpu"][1], "float32")


def test_forward_mode_autodiff_works_under_xla_only():
    """jax.jvp through the whole CapPa loss: custom_vjp forbids it under "cpu"; under "xla" the
    directional derivative equals the "cpu" reverse-mode gradient's."""
    params, image = _params(), _batch()[0]
    tangent = _random_params(_cappa("xla"), *_batch()[:3], seed=5)
    _, jvp = jax.jit(lambda p, t: jax.jvp(lambda q: _loss(_cappa("xla"))(q, image), (p,), (t,)))(
        params, tangent
    )
    grads = _run("cpu")[1][0]  # reverse mode, "cpu" kernels
    want = sum(
        jnp.vdot(g, t)
        for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent), strict=True)
    )
    np.testing.assert_allclose(jvp, want, rtol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda q: _loss(_cappa("cpu"))(q, image), (params,), (tangent,))


@pytest.mark.parametrize("scan", [False, True])
def test_attention_maps_and_kv_cached_decoding_are_equal(scan, monkeypatch):
    """Maps (probabilities computed explicitly under "xla") and KV-cached decoding; decoding (no maps
    asked for) under "xla" runs jax.nn.dot_product_attention, under "cpu" never."""
    image, tokens, _, labels = _batch()
    params = _params(scan=scan)
    maps = {
        k: attention.capture(_cappa(k, scan=scan), params, image, labels) for k in ("cpu", "xla")
    }
    for part in ("encoder", "cross"):
        assert len(maps["xla"][part]) == (2 if scan else 1)
        for a, b in zip(maps["xla"][part], maps["cpu"][part], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    calls = []
    fused = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    )

    def decode(kernels):  # prefill 3 tokens, then one cached step
        model = _cappa(kernels, scan=scan)
        apply = lambda *a, **kw: model.apply(*a, **kw, method=cappa.Model.decode, mutable=["cache"])

        def run(params, image, tokens):
            encoded, _ = model.apply({"params": params}, image, method=cappa.Model.encode)
            logits, state = apply({"params": params}, tokens[:, :3], encoded, decode=True)
            step, _ = apply({"params": params, **state}, tokens[:, 3:4], None, decode=True)
            return logits, step

        return jax.jit(run)(params, image, tokens)

    for a, b in zip(decode("xla"), decode("cpu"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert calls  # the fused attention ran under "xla" (and only there)
    n = len(calls)
    decode("cpu")
    assert len(calls) == n


def _barrier_axes(mesh_context) -> set[str]:
    """Mesh axes of the shard_map that the barrier's backward runs its cond in (empty: none)."""
    x = jnp.ones((8, 4), jnp.float32)
    with mesh_context:
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jnp.sin(linear.grad_barrier(x)))))(x)
    maps = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    return set().union(*(e.params["newly_manual_axes"] for e in maps))


def test_grad_barrier_follows_config_batch_axes():
    """Batch split over "data" only (config.batch_axes), parameters over "fsdp": the barrier's cond
    runs per "data" shard. It used to take every mesh axis of size > 1."""
    mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)])
    assert _barrier_axes(sharding.set_mesh(mesh, ("data",))) == {"data"}
    assert _barrier_axes(sharding.set_mesh(mesh)) == {"data", "fsdp"}
    assert _barrier_axes(jax.set_mesh(mesh)) == {"data", "fsdp"}
    with sharding.set_mesh(mesh, ["fsdp"]):
        assert sharding._batch_axes(None) == (("fsdp",), 4)
        with jax.set_mesh(sharding.make_mesh([("data", -1)])):  # another mesh: its own axes
            assert sharding._batch_axes(None) == (("data",), 8)
    assert sharding._batch_axes(None) == ((), 1)
    with pytest.raises(ValueError, match="batch_axes"):
        with sharding.set_mesh(mesh, ("batch",)):
            pass


class _Traced(Exception):
    pass


def test_the_loop_traces_the_barrier_over_config_batch_axes(tiny_config, tmp_path, monkeypatch):
    """The train loop's step, traced for the tiny classifier: the barrier reads config.batch_axes.
    (The spy stops the run at the first barrier it sees, before anything is compiled.)"""
    seen = []

    def spy(fn, x):
        seen.append(sharding._batch_axes(None)[0])
        raise _Traced

    monkeypatch.setattr(sharding, "per_batch_shard", spy)
    tiny_config.update(mesh=[("data", 2), ("fsdp", 4)], batch_axes=("data",), log_flops=False)
    tiny_config.evals = {}
    with pytest.raises(_Traced):
        train.train(tiny_config, str(tmp_path))
    assert seen == [("data",)]
