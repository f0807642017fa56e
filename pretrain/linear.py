"""Dense layers, attention, GELU and residual gradients written so that XLA:CPU compiles the backward well.

These helpers change how the backward pass is *written*, never what it computes: forward values and
gradients equal the plain JAX formulations (tests/test_linear.py). They exist because patterns of
JAX's autodiff output hit weak spots of XLA:CPU (measured on the S/16 CapPa step of
benchmarks/cappa_step.py and found with benchmarks/profile_step.py; BENCHMARKS.md):

* `dot_general`, for `nn.Dense(..., dot_general=linear.dot_general)`: autodiff writes a dense layer's
  weight gradient as `dot_general(g, x)` followed by a transpose to the kernel's `[in, out]` order, and
  XLA:CPU then copies the big `[tokens, out]` cotangent into a transposed layout before the matmul. Here
  the transposed operand is always the smaller of the two (x or g), and only the small `[in, out]`
  result is transposed.
* `grad_barrier(x)` on the residual stream: XLA:CPU fuses the chain of residual-gradient additions
  into every consumer, so block i's backward re-summed the cotangents of all blocks above it (memory
  traffic growing with depth squared). `lax.optimization_barrier` would stop that, but XLA:CPU strips
  it; a `lax.cond` whose branches are both the identity is a boundary it keeps. Under a mesh the cond
  runs on each device's batch shard (`sharding.per_batch_shard`): its predicate costs no collective.
* `add_bias` (and `Dense`, the vocabulary head): the bias gradient as `ones @ g`, not a sum over rows.
* `attention`: softmax attention whose backward is written out, every matmul a plain batched
  `[heads, T, D]` product. Autodiff's version made XLA:CPU pick transposed operand and output layouts
  (e.g. `P @ V` computed as `[D, T]`), which ran at 55-97 GFLOP/s and needed extra transposing copies.
* `gelu`: the MLP's tanh GELU with the tanh recomputed in the backward instead of stored.

The first two took the S/16 step from 5.5-6.0 s to 3.9-4.9 s on 2 CPU cores; `attention` then took it
from 3.75 to 3.42 s (1 device; 4.92 -> 4.56 s on 8 fake devices) in an interleaved A/B (BENCHMARKS.md).
On TPU and GPU the rewritten ops do the same FLOPs and `grad_barrier` is the identity; none of them was
measured there.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transfer import sharding


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.dot_general` (same signature), with a CPU-friendly backward for the dense pattern.

    The dense pattern: no batch dimensions, `lhs` contracts its trailing dims with the leading dims of
    `rhs`, equal dtypes, no `preferred_element_type`. Anything else goes to `lax.dot_general` as is.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    dense_pattern = (
        not lhs_batch
        and not rhs_batch
        and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
        and tuple(rhs_contract) == tuple(range(n))
        and lhs.dtype == rhs.dtype
        and preferred_element_type is None
        and not kwargs
    )
    if not dense_pattern:
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )
    return _dense_dot(lhs, rhs, n, precision)


def _forward(x: jax.Array, w: jax.Array, n: int, precision: Any) -> jax.Array:
    dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    return lax.dot_general(x, w, dims, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_dot(x: jax.Array, w: jax.Array, n: int, precision: Any) -> jax.Array:
    return _forward(x, w, n, precision)


def _dense_dot_fwd(x, w, n, precision):
    return _forward(x, w, n, precision), (x, w)


def _dense_dot_bwd(n, precision, residuals, g):
    x, w = residuals
    lead = x.ndim - n  # x's free (batch, token, ...) dims: also g's leading dims
    g = g.astype(x.dtype)
    # dx[..., k] = sum_o g[..., o] w[k, o]
    dx_dims = ((tuple(range(lead, g.ndim)), tuple(range(n, w.ndim))), ((), ()))
    dx = lax.dot_general(g, w, dx_dims, precision=precision)
    # dw[k, o] = sum_... x[..., k] g[..., o]. The matmul's first operand gets transposed by XLA:CPU,
    # so put the smaller one first; when that is g, transpose the (small) [out, in] result back.
    over_tokens = ((tuple(range(lead)), tuple(range(lead))), ((), ()))
    if x.size > g.size:
        dw_t = lax.dot_general(g, x, over_tokens, precision=precision)  # [out..., in...]
        out_dims = g.ndim - lead
        dw = jnp.transpose(dw_t, (*range(out_dims, dw_t.ndim), *range(out_dims)))
    else:
        dw = lax.dot_general(x, g, over_tokens, precision=precision)  # [in..., out...]
    return dx, dw


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is materialised once (on CPU), cutting the residual-gradient chain."""
    return x


def _grad_barrier_fwd(x):
    return x, None


def _grad_barrier_bwd(_, cotangent):
    if jax.default_backend() != "cpu":
        return (cotangent,)
    # Per device shard: the predicate read from a sharded cotangent would otherwise be a collective.
    return (sharding.per_batch_shard(_identity_cond, cotangent),)


def _identity_cond(cotangent: jax.Array) -> jax.Array:
    # A data-dependent predicate, so XLA cannot fold the cond away. Both branches return the input
    # (the second only for a NaN); they must not be spelled identically, or XLA merges them.
    first = cotangent.reshape(-1)[0]
    return lax.cond(first == first, lambda c: c, lambda c: c + 0.0, cotangent)


grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` over the last axis, whose bias gradient is a matmul with a ones vector.

    Autodiff writes the bias gradient as a sum over every leading axis, and XLA:CPU's (YNNPACK)
    reduction is pathological on wide rows: 125 ms to sum a [1024, 32000] cotangent over its rows,
    against 3 ms as `ones @ g` (one-off timings of the S/16 CapPa step's vocabulary head; BENCHMARKS.md).
    """
    if bias.shape != y.shape[-1:]:
        raise ValueError(f"add_bias: bias {bias.shape} must be y's last axis {y.shape[-1:]}")
    return y + bias


def _add_bias_fwd(y, bias):
    return add_bias(y, bias), None


def _add_bias_bwd(_, g):
    rows = g.reshape(-1, g.shape[-1])
    return g, jnp.ones((rows.shape[0],), g.dtype) @ rows


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention, logits and softmax in float32; q [B,Q,H,D], k/v [B,K,H,D].

    ``mask`` broadcastable to [B,H,Q,K] (True = may attend) or None. Returns (out [B,Q,H,D] in
    ``dtype``, probs [B,H,Q,K] float32). Values equal the autodiff reference; the backward is written
    out (see the module docstring), including the gradient that flows through ``probs``.
    """
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B,T,H,D] <-> [B,H,T,D]
    y, probs = _attention(heads_first(q), heads_first(k), heads_first(v), mask, jnp.dtype(dtype))
    return heads_first(y), probs


def _attention_fwd_values(q, k, v, mask, dtype):
    q32 = q.astype(jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
    k32 = k.astype(jnp.float32)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q32, k32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v.astype(dtype))
    return (y, probs), (q32, k32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, dtype):
    return _attention_fwd_values(q, k, v, mask, dtype)[0]


def _attention_fwd(q, k, v, mask, dtype):
    (y, probs), (q32, k32) = _attention_fwd_values(q, k, v, mask, dtype)
    dtypes = (jnp.zeros((0,), q.dtype), jnp.zeros((0,), k.dtype))  # residuals must be arrays
    return (y, probs), (q32, k32, v, mask, probs, dtypes)


def _attention_bwd(dtype, residuals, cotangents):
    q32, k32, v, mask, probs, (q_like, k_like) = residuals
    dy, dprobs = cotangents
    dp = jnp.einsum("bhqd,bhkd->bhqk", dy.astype(dtype), v.astype(dtype)).astype(jnp.float32)
    dp = dp + dprobs  # a zero array unless a loss reads the probabilities
    dlogits = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))
    if mask is not None:  # where(mask, logits, min) passes no gradient to masked logits
        dlogits = jnp.where(mask, dlogits, 0.0)
    scale = 1.0 / np.sqrt(q32.shape[-1]).astype(np.float32)
    dq = jnp.einsum("bhqk,bhkd->bhqd", dlogits, k32) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", dlogits, q32)
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(dtype), dy.astype(dtype))
    return dq.astype(q_like.dtype), dk.astype(k_like.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """`jax.nn.gelu` (tanh approximation, flax's default), same values; the backward recomputes the tanh.

    Autodiff keeps the tanh as a second activation-sized array, written in its own pass over the MLP's
    widest activation; recomputing it in the backward pass is cheaper on CPU than storing and reading it.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    t = jnp.tanh(c * (x + 0.044715 * (x**3)))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * (x * x))
    return (g * slope,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Dense(nn.Module):
    """`nn.Dense` with the same parameters (``kernel`` [in, out], ``bias`` [out], float32) and values,
    built from this module's `dot_general` and `add_bias` for the CPU-friendly backward."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = (
            self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else add_bias(y, bias)
