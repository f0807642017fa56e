"""pretrain/linear.py: same values and gradients as plain lax.dot_general / identity; the chain is cut.
The "xla" kernels' attention equals the same reference (tests/test_kernels.py compares whole models)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pretrain import linear

RNG = np.random.default_rng(0)


def _grads(fn, *args):
    return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1)))(*args)


# (x shape, w shape, contracting dims): Dense on tokens, Dense on a vector batch, DenseGeneral into
# heads (q/k/v), DenseGeneral out of heads (attention's `out`), and g smaller than x with one and with two
# contracting dims (the branch that transposes the [out, in] result back).
DENSE_CASES = [
    ((3, 5, 8), (8, 4), 1),
    ((6, 8), (8, 16), 1),
    ((2, 5, 8), (8, 2, 3), 1),
    ((2, 5, 2, 3), (2, 3, 8), 2),
    ((2, 5, 16), (16, 4), 1),
    ((2, 5, 2, 4), (2, 4, 3), 2),
]


@pytest.mark.parametrize("x_shape, w_shape, n", DENSE_CASES)
def test_dense_pattern_matches_lax_dot_general(x_shape, w_shape, n):
    x = jnp.asarray(RNG.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(RNG.normal(size=w_shape), jnp.float32)
    dims = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))
    ours = lambda a, b: linear.dot_general(a, b, dims)
    ref = lambda a, b: lax.dot_general(a, b, dims)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(ours, x, w), _grads(ref, x, w), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_other_patterns_fall_back_with_correct_gradients():
    """A batched contraction (attention-like) is not the dense pattern: plain dot_general."""
    q = jnp.asarray(RNG.normal(size=(2, 3, 4, 5)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(2, 3, 6, 5)), jnp.float32)
    dims = (((3,), (3,)), ((0, 1), (0, 1)))
    ours = lambda a, b: linear.dot_general(a, b, dims)
    ref = lambda a, b: lax.dot_general(a, b, dims)
    for got, want in zip(_grads(ours, q, k), _grads(ref, q, k), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_dense_bf16_gradients_keep_dtypes_and_values():
    x = jnp.asarray(RNG.normal(size=(4, 6, 8)), jnp.float32)
    ours = nn.Dense(16, dtype=jnp.bfloat16, dot_general=linear.dot_general)
    ref = nn.Dense(16, dtype=jnp.bfloat16)
    params = ref.init(jax.random.key(0), x)
    loss = lambda model: lambda p, x: jnp.sum(model.apply(p, x).astype(jnp.float32) ** 2)
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2, atol=2e-2)


def _residual_stack_grad(barrier: bool):
    """Gradient of a 10-block pre-norm residual MLP stack (the pattern of a ViT's residual stream)."""

    def loss(ws, x):
        for w1, w2 in ws:
            if barrier:
                x = linear.grad_barrier(x)
            h = x - x.mean(-1, keepdims=True)
            h = h * lax.rsqrt((h * h).mean(-1, keepdims=True) + 1e-6)
            x = x + jnp.tanh(h @ w1) @ w2
        return jnp.sum(x * x)

    rng = np.random.default_rng(1)  # the same weights for both variants
    ws = [
        (
            jnp.asarray(rng.normal(size=(16, 32)) * 0.1, jnp.float32),
            jnp.asarray(rng.normal(size=(32, 16)) * 0.1, jnp.float32),
        )
        for _ in range(10)
    ]
    x = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return step(ws, x), step.lower(ws, x).compile().as_text()


def _max_fusion_operands(hlo: str) -> int:
    return max(m.group(1).count("%") for m in re.finditer(r" fusion\((.*?)\), kind", hlo))


def test_grad_barrier_is_the_identity_and_cuts_the_residual_gradient_chain():
    (plain_grads, plain_hlo) = _residual_stack_grad(barrier=False)
    (cut_grads, cut_hlo) = _residual_stack_grad(barrier=True)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(cut_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":
        # Without the barrier one fusion re-sums the residual cotangents of many blocks; with it,
        # no fusion reads more than a block's worth of operands.
        assert _max_fusion_operands(plain_hlo) > 20
        assert _max_fusion_operands(cut_hlo) <= 10


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_dense_has_the_parameters_values_and_gradients_of_nn_dense(dtype, tol):
    """linear.Dense (the vocabulary head) is a drop-in for nn.Dense: same parameter tree, so
    checkpoints load unchanged, and the same outputs and parameter/input gradients."""
    x = jnp.asarray(RNG.normal(size=(2, 7, 12)), jnp.float32)
    ours = linear.Dense(20, dtype=dtype, bias_init=nn.initializers.normal(1.0))
    ref = nn.Dense(20, dtype=dtype)
    params = ours.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, ref.init(jax.random.key(0), x)["params"]
    )
    assert params["kernel"].dtype == params["bias"].dtype == jnp.float32

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x).astype(jnp.float32)))

    np.testing.assert_allclose(
        ours.apply({"params": params}, x).astype(jnp.float32),
        ref.apply({"params": params}, x).astype(jnp.float32),
        rtol=tol,
        atol=tol,
    )
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=tol, atol=tol)
    assert float(jnp.abs(got[0]["bias"]).sum()) > 0  # the bias gradient is not trivially zero
    no_bias = linear.Dense(20, use_bias=False).init(jax.random.key(0), x)["params"]
    assert set(no_bias) == {"kernel"}


def test_add_bias_rejects_a_bias_that_is_not_the_last_axis():
    with pytest.raises(ValueError, match="last axis"):
        linear.add_bias(jnp.zeros((2, 3)), jnp.zeros((2,)))


def _reference_attention(q, k, v, mask, dtype):
    """The autodiff formulation `linear.attention` replaces (logits and softmax in float32)."""
    q = q.astype(jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype)), probs


def _attention_mask(kind):
    if kind == "none":
        return None
    if kind == "causal":  # [1, 1, Q, K] with Q = K
        return jnp.tril(jnp.ones((5, 5), bool))[None, None]
    mask = jnp.asarray(RNG.random((2, 1, 5, 5)) > 0.4)  # per example, broadcast over heads
    return mask.at[0, 0, 1].set(False)  # one query that may attend nowhere


@pytest.mark.parametrize("mask_kind", ["none", "causal", "random_with_an_empty_row"])
@pytest.mark.parametrize("loss_reads_probs", [False, True])
def test_attention_values_and_gradients_equal_autodiff(mask_kind, loss_reads_probs):
    q, k, v = (jnp.asarray(RNG.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = _attention_mask(mask_kind)

    def loss(fn):
        def value(q, k, v):
            y, probs = fn(q, k, v, mask, jnp.float32)
            extra = jnp.sum(probs * probs[..., ::-1]) if loss_reads_probs else 0.0
            return jnp.sum(jnp.sin(y)) + extra

        return value

    outputs = (f(q, k, v, mask, jnp.float32) for f in (linear.attention, _reference_attention))
    for ours, ref in zip(*outputs, strict=True):  # (y, probs)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    got = jax.jit(jax.grad(loss(linear.attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got[0]))) > 0  # a gradient that is there to compare


@pytest.mark.parametrize("mask_kind", ["none", "causal", "random_with_an_empty_row"])
@pytest.mark.parametrize("need_probs", [False, True])
def test_xla_attention_equals_autodiff(mask_kind, need_probs):
    """The "xla" kernels' attention: jax.nn.dot_product_attention without probabilities, the explicit
    formulation with them; both the reference's values and gradients (a query that may attend nowhere
    averages all values in both: -inf-like logits everywhere give a uniform softmax)."""
    q, k, v = (jnp.asarray(RNG.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = _attention_mask(mask_kind)
    y, probs = linear.xla_attention(q, k, v, mask, jnp.float32, need_probs)
    want_y, want_probs = _reference_attention(q, k, v, mask, jnp.float32)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    if need_probs:
        np.testing.assert_allclose(probs, want_probs, rtol=1e-6, atol=1e-6)
    else:
        assert probs is None
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, mask, jnp.float32)[0]))
    xla = lambda *a: linear.xla_attention(*a, need_probs)
    got = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_attention_bf16_keeps_dtypes_and_is_close_to_float32():
    q, k, v = (jnp.asarray(RNG.normal(size=(2, 5, 3, 4)), jnp.bfloat16) for _ in range(3))
    y, probs = linear.attention(q, k, v, None, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, None, jnp.bfloat16)[0].astype(jnp.float32)))
    got = jax.grad(loss(linear.attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        assert g.dtype == x.dtype
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=0.05, atol=0.05)


def test_grad_barrier_on_a_mesh_is_the_identity_without_collectives():
    """Under a data-parallel mesh the barrier's predicate is read per device: no all-reduce."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    n = len(jax.devices())
    x = jnp.asarray(RNG.normal(size=(2 * n, 3, 4)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(4, 4)), jnp.float32)

    def loss(x, w, barrier):
        y = linear.grad_barrier(x) if barrier else x
        return jnp.sum(jnp.sin(y @ w) * x)

    grad = lambda barrier: jax.jit(jax.grad(lambda x, w: loss(x, w, barrier)))
    with jax.set_mesh(mesh):
        x = jax.device_put(x, spec)
        want = grad(False)(x, w)
        got = grad(True)(x, w)
        hlo = grad(True).lower(x, w).compile().as_text()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if jax.default_backend() == "cpu" and n > 1:
        assert " conditional(" in hlo  # the barrier is there...
        assert "all-reduce(" not in hlo  # ...and reads its predicate without communicating


def test_per_batch_shard_applies_fn_per_shard_or_whole():
    from transfer import sharding

    x = jnp.arange(48.0).reshape(16, 3)
    first_row = lambda a: a - a[0]  # shows where the shard boundaries are
    np.testing.assert_array_equal(sharding.per_batch_shard(first_row, x), x - x[0])  # no mesh
    n = len(jax.devices())
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda a: sharding.per_batch_shard(first_row, a))(x)
        odd = jax.jit(lambda a: sharding.per_batch_shard(first_row, a))(x[: n - 1 or 1])
    want = np.concatenate([c - c[0] for c in np.split(np.asarray(x), n)])  # 16 rows over n shards
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(odd, x[: n - 1 or 1] - x[0])  # not divisible: the whole array


@pytest.mark.parametrize(
    "dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)]
)  # (1 + tanh) cancels in the tails
def test_gelu_equals_jax_gelu_in_value_and_gradient(dtype, tol):
    x = jnp.asarray(np.linspace(-6, 6, 301), dtype)
    np.testing.assert_array_equal(linear.gelu(x), jax.nn.gelu(x, approximate=True))
    loss = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x).astype(jnp.float32))))
    got = jax.jit(loss(linear.gelu))(x)
    want = loss(lambda x: jax.nn.gelu(x, approximate=True))(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)
