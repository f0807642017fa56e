"""The towers' dense layers, attention, GELU and residual stream, in two interchangeable sets of kernels.

`ops(kernels)` returns the set a model config asks for (`model.kernels`, see `KERNELS`):

* ``"cpu"``: custom-VJP rewrites for XLA:CPU. They change how the backward pass is *written*, never what
  it computes (forward values and gradients equal the plain formulation, tests/test_linear.py and
  tests/test_kernels.py), working around patterns of JAX's autodiff output that XLA:CPU compiles badly
  (found with benchmarks/profile_step.py on the S/16 CapPa step; measurements in BENCHMARKS.md):

  - `dot_general`, for `nn.Dense(..., dot_general=...)`: autodiff writes a dense layer's weight gradient
    as `dot_general(g, x)` plus a transpose, and XLA:CPU copies the big `[tokens, out]` cotangent into a
    transposed layout first. Here the transposed operand is the smaller of x and g, and only the small
    `[in, out]` result is transposed.
  - `grad_barrier(x)` on the residual stream: XLA:CPU fuses the chain of residual-gradient additions into
    every consumer, so block i's backward re-summed the cotangents of all blocks above it.
    `lax.optimization_barrier` would stop that, but XLA:CPU strips it; a `lax.cond` whose branches are
    both the identity is a boundary it keeps. Under a mesh the cond runs on each device's batch shard
    (`sharding.per_batch_shard`, over the run's `config.batch_axes`): its predicate costs no collective.
  - `add_bias` (and `Dense`, the vocabulary head): the bias gradient as `ones @ g`, not a row sum.
  - `attention`: softmax attention whose backward is written out, every matmul a plain batched
    `[heads, T, D]` product (autodiff's made XLA:CPU pick transposed layouts and extra copies). It always
    materialises the float32 `[B, H, Q, K]` probabilities.
  - `gelu`: the MLP's tanh GELU with the tanh recomputed in the backward instead of stored.

* ``"xla"``: the plain layers: `lax.dot_general`, `y + bias`, `jax.nn.gelu(approximate=True)`, no barrier,
  and `jax.nn.dot_product_attention` (``implementation=None``: JAX's choice, which in jax 0.10.2 is always
  its XLA formulation; cuDNN's fused attention must be named, ``implementation="cudnn"``) unless the caller
  needs the probabilities (attention maps), which are then computed explicitly. No custom VJP, so forward-mode
  autodiff (`jax.jvp`, `jax.jacfwd`) works, and nothing is tuned for a backend.

* ``"auto"`` (the default): ``"cpu"`` when the code is traced for CPU devices, ``"xla"`` otherwise.

Both sets create no parameters of their own (the modules own them), so a model has the same parameter tree
under every setting and checkpoints move freely between them. The rewrites were measured on CPU only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

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
    if platform() != "cpu":
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

    Autodiff writes the bias gradient as a sum over every leading axis, and XLA:CPU's reduction is very
    slow on wide rows such as the vocabulary head's cotangent (BENCHMARKS.md).
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
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dtype: Any,
    need_probs: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention, logits and softmax in float32; q [B,Q,H,D], k/v [B,K,H,D].

    ``mask`` broadcastable to [B,H,Q,K] (True = may attend) or None. Returns (out [B,Q,H,D] in
    ``dtype``, probs [B,H,Q,K] float32). Values equal the autodiff reference; the backward is written
    out (see the module docstring), including the gradient that flows through ``probs``. The
    probabilities are always computed (``need_probs`` is there for `xla_attention`'s signature).
    """
    del need_probs
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


def _explicit_attention(q, k, v, mask, dtype):
    """The autodiff formulation `attention` rewrites: logits and softmax in float32, probs returned."""
    q32 = q.astype(jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q32, k.astype(jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype)), probs


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dtype: Any,
    need_probs: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """`attention`'s contract with plain autodiff: (out [B,Q,H,D] in ``dtype``, probs or None).

    Without ``need_probs``: `jax.nn.dot_product_attention` (logits and softmax in float32;
    ``implementation=None`` leaves the kernel to JAX), and no probabilities (None). With it: the
    probabilities [B,H,Q,K] float32 computed explicitly (attention maps), as `attention` does.
    """
    if need_probs:
        return _explicit_attention(q, k, v, mask, jnp.dtype(dtype))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    mask = None if mask is None else jnp.asarray(mask, bool)
    return jax.nn.dot_product_attention(q, k, v, mask=mask), None


def _xla_grad_barrier(x: jax.Array) -> jax.Array:
    return x


def _xla_add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias


def _xla_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


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


KERNELS = ("auto", "xla", "cpu")


class Ops(NamedTuple):
    """One set of kernels (see the module docstring); every function has the signature of the "cpu" one."""

    name: str  # "cpu" | "xla"
    dot_general: Callable[..., jax.Array]
    grad_barrier: Callable[[jax.Array], jax.Array]
    add_bias: Callable[[jax.Array, jax.Array], jax.Array]
    # (q, k, v, mask, dtype, need_probs) -> (out, probs); probs may be None when not needed.
    attention: Callable[..., tuple[jax.Array, jax.Array | None]]
    gelu: Callable[[jax.Array], jax.Array]


def platform() -> str:
    """The platform being traced for: the context mesh's devices (`jax.set_mesh`), else JAX's default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def resolve(kernels: str) -> str:
    """``"auto" | "xla" | "cpu"`` -> ``"cpu" | "xla"`` (auto: "cpu" exactly when tracing for CPU)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels = {kernels!r}: use one of {KERNELS}")
    if kernels == "auto":
        return "cpu" if platform() == "cpu" else "xla"
    return kernels


def ops(kernels: str) -> Ops:
    """The set of kernels ``kernels`` resolves to at trace time (`resolve`)."""
    return _CPU if resolve(kernels) == "cpu" else _XLA


_CPU = Ops("cpu", dot_general, grad_barrier, add_bias, attention, gelu)
_XLA = Ops("xla", lax.dot_general, _xla_grad_barrier, _xla_add_bias, xla_attention, _xla_gelu)


class Dense(nn.Module):
    """`nn.Dense` with the same parameters (``kernel`` [in, out], ``bias`` [out], float32) and values,
    built from the ``kernels`` set's `dot_general` and `add_bias` (the CPU-friendly backward on "cpu")."""

    features: int
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = (
            self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        k = ops(self.kernels)
        y = k.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else k.add_bias(y, bias)
