"""SigLIP's sigmoid loss over the global batch, without materialising the N x N logits on any one device.

The pairwise loss couples every image with every text of the global batch, so a plain `logits = img @ txt.T` on a
sharded batch makes XLA gather one side and, in the backward pass, keep an [N, N] (or [N/n, N]) block per device:
memory grows with the global batch. Here the batch stays split over the mesh's batch axes (`jax.shard_map`) and:

- `mode="ring"`: each device keeps its images and sees one text chunk at a time; the chunks travel around the ring
  of devices with `ppermute`. A custom backward pass runs the ring again (recomputing each [Bi, Bt] block) with the
  text gradients travelling alongside their chunk until they are back home, so nothing saved or live is larger than
  the local batch: per-device memory grows with the local batch, not the global one.
- `mode="allgather"`: the texts are all-gathered and each device computes its [Bi, N] rows; simpler, one
  collective, memory grows with N (autodiff does the backward pass).
- `mode="dense"`: the whole [N, N] logits, as the reference.

All three give the same loss and gradients (tests/test_sigmoid_loss.py checks forward and backward on 8 devices).
The similarity of an image and a text is a pluggable `pair_logits(pair_params, img_chunk, txt_chunk) -> [Bi, Bt]`,
applied per (image chunk, text chunk), so Llip's per-pair mixing of K tokens works unchanged. Its parameters are an
explicit argument (`pair_params`, replicated) rather than a closure, because the ring's custom backward pass must
see every differentiated value to return its gradient (summed over devices); traced arrays a `pair_logits` closes
over anyway are hoisted into arguments with `jax.closure_convert`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

PairLogits = Callable[[Any, jax.Array, jax.Array], jax.Array]
MODES = ("ring", "allgather", "dense")


def dot_pair_logits(pair_params: Any, img: jax.Array, txt: jax.Array) -> jax.Array:
    """The SigLIP similarity: dot products of [Bi, D] image and [Bt, D] text embeddings. Ignores `pair_params`."""
    if img.ndim != 2:
        raise ValueError(
            f"The default pair_logits takes [B, D] image embeddings, got shape {tuple(img.shape)}; "
            "pass pair_logits=... for per-image token sets such as Llip's [B, K, D]."
        )
    return img @ txt.T


def _pair_labels(rows: int, cols: int, row_offset: jax.Array | int = 0) -> jax.Array:
    """+1 where the global image index equals the global text index, -1 elsewhere."""
    i = jnp.arange(rows)[:, None] + row_offset
    j = jnp.arange(cols)[None, :]
    return jnp.where(i == j, 1.0, -1.0)


def _summed_loss(logits: jax.Array, labels: jax.Array | float) -> jax.Array:
    """-sum log sigmoid(label * logit), in at least float32 (bfloat16 logits would lose the sum)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(logits: jax.Array) -> jax.Array:
    """SigLIP: -(1/N) sum_ij log sigmoid(label_ij * logits_ij), label +1 on the diagonal, -1 elsewhere.

    `logits` [N, N] has images on rows and texts on columns; the sum over all pairs is averaged over the N images.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(
            f"sigmoid_loss needs square [N, N] logits (image i matches text i), got {tuple(logits.shape)}."
        )
    n = logits.shape[0]
    return _summed_loss(logits, _pair_labels(n, n)) / n


def _block_loss(
    pair_logits: PairLogits,
    positive: bool,
    pair_params: Any,
    img: jax.Array,
    txt: jax.Array,
    t_param: jax.Array,
    b: jax.Array,
) -> jax.Array:
    """Summed loss of one [Bi, Bt] block; `positive` = the texts are the images' own (diagonal positives)."""
    logits = jnp.exp(t_param) * pair_logits(pair_params, img, txt) + b
    labels = _pair_labels(*logits.shape) if positive else -1.0
    return _summed_loss(logits, labels)


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring_local(pair_logits, axes, n, img, txt, t_param, b, pair_params):
    """This device's summed loss: own block (with the positives), then n - 1 text chunks arriving from the left."""
    block = functools.partial(_block_loss, pair_logits)
    total = block(True, pair_params, img, txt, t_param, b)

    def step(_, carry):
        chunk, total = carry
        chunk = jax.lax.ppermute(chunk, axes, _ring_perm(n))
        return chunk, total + block(False, pair_params, img, chunk, t_param, b)

    return jax.lax.fori_loop(1, n, step, (txt, total))[1]


def _ring_local_fwd(pair_logits, axes, n, img, txt, t_param, b, pair_params):
    # Residuals are the inputs themselves: nothing of size N x anything is kept for the backward pass.
    residuals = (img, txt, t_param, b, pair_params)
    return _ring_local(pair_logits, axes, n, img, txt, t_param, b, pair_params), residuals


def _ring_local_bwd(pair_logits, axes, n, residuals, g):
    """The forward ring again, recomputing each block: image, t, b and pair_params gradients accumulate in place,
    a chunk's text gradient travels with the chunk and one last hop brings it home to the device that owns it."""
    img, txt, t_param, b, pair_params = residuals

    def grads(chunk, positive):
        fn = functools.partial(_block_loss, pair_logits, positive)
        _, vjp = jax.vjp(fn, pair_params, img, chunk, t_param, b)
        d_params, d_img, d_chunk, d_t, d_b = vjp(g)
        return d_chunk, (d_params, d_img, d_t, d_b)

    d_txt, acc = grads(txt, True)

    def step(_, carry):
        chunk, d_chunk, acc = carry
        chunk, d_chunk = jax.lax.ppermute((chunk, d_chunk), axes, _ring_perm(n))
        d_more, acc_more = grads(chunk, False)
        return chunk, d_chunk + d_more, jax.tree.map(jnp.add, acc, acc_more)

    _, d_chunk, (d_params, d_img, d_t, d_b) = jax.lax.fori_loop(1, n, step, (txt, d_txt, acc))
    d_txt = jax.lax.ppermute(d_chunk, axes, _ring_perm(n))  # Device i held chunk i + 1's gradient.
    return d_img, d_txt, d_t, d_b, d_params


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def _specs(axes: tuple[str, ...]) -> tuple:
    batch = PartitionSpec(axes)
    return (batch, batch, PartitionSpec(), PartitionSpec(), PartitionSpec())


def _ring_loss(pair_logits, axes, img, txt, t_param, b, pair_params):
    n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)

    def local(img, txt, t_param, b, pair_params):
        # Per-device (varying) copies of the replicated inputs: the custom backward pass returns this device's
        # share of their gradient and the transpose of this cast sums the shares over devices.
        t_param, b, pair_params = jax.lax.pcast((t_param, b, pair_params), axes, to="varying")
        # Traced arrays pair_logits closes over must cross the custom_vjp boundary as arguments to get gradients.
        converted, consts = jax.closure_convert(pair_logits, pair_params, img, txt)

        def similarity(params, img, txt):
            return converted(params[0], img, txt, *params[1])

        params = (pair_params, tuple(consts))
        total = _ring_local(similarity, axes, n, img, txt, t_param, b, params)
        return jax.lax.psum(total, axes)

    summed = jax.shard_map(
        local, in_specs=_specs(axes), out_specs=PartitionSpec(), axis_names=frozenset(axes)
    )(img, txt, t_param, b, pair_params)
    return summed / img.shape[0]


def _allgather_loss(pair_logits, axes, img, txt, t_param, b, pair_params):
    def local(img, txt, t_param, b, pair_params):
        texts = jax.lax.all_gather(txt, axes, tiled=True)  # [N, D]
        logits = jnp.exp(t_param) * pair_logits(pair_params, img, texts) + b  # [Bi, N]
        offset = jax.lax.axis_index(axes) * img.shape[0]
        return jax.lax.psum(_summed_loss(logits, _pair_labels(*logits.shape, offset)), axes)

    summed = jax.shard_map(
        local, in_specs=_specs(axes), out_specs=PartitionSpec(), axis_names=frozenset(axes)
    )(img, txt, t_param, b, pair_params)
    return summed / img.shape[0]


def _dense_loss(pair_logits, img, txt, t_param, b, pair_params):
    return sigmoid_loss(jnp.exp(t_param) * pair_logits(pair_params, img, txt) + b)


def _resolve_axes(batch_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes the batch is split over (as `sharding.constrain_batch`): None = every axis of size > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    if batch_axes is None:
        return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"chunked_sigmoid_loss: batch_axes {unknown} are not axes of the mesh {mesh.axis_names}; "
            "pass names from config.mesh (or None for all of them)."
        )
    manual = [a for a in axes if a in mesh.manual_axes]
    if manual:
        raise ValueError(
            f"chunked_sigmoid_loss: mesh axes {manual} are already manual (called inside shard_map); "
            "call it on the global batch, outside shard_map."
        )
    return axes


def chunked_sigmoid_loss(
    img: jax.Array,
    txt: jax.Array,
    t_param: jax.Array,
    b: jax.Array,
    *,
    pair_logits: PairLogits | None = None,
    pair_params: Any = None,
    batch_axes: str | Sequence[str] | None = None,
    mode: str = "ring",
) -> jax.Array:
    """The sigmoid loss of the global batch, split over the mesh's batch axes; equals the dense loss.

    img: [N, ...] per-image representation ([N, D] embeddings, or Llip's [N, K, D] mixture tokens);
    txt: [N, D] text embeddings; image i's positive is text i. logits_ij = exp(t_param) * s_ij + b with
    s = pair_logits(pair_params, img_chunk [Bi, ...], txt_chunk [Bt, D]) -> [Bi, Bt] (default: dot products).
    `pair_params` is any pytree the similarity uses (Llip's mixing weights), replicated on every device; its
    gradient, like those of img, txt, t_param and b, equals the dense loss's. Pass the similarity's weights in
    `pair_params`; traced arrays `pair_logits` closes over get their gradient too (`jax.closure_convert`).

    Inside a mesh context (`jax.set_mesh`, as the train loop runs) the batch is taken as split over `batch_axes`
    (None = every mesh axis of size > 1, as `sharding.constrain_batch`); outside one, or on one device, or with
    mode="dense", it is the dense loss. Reverse-mode differentiation only (mode="ring" has a custom vjp).
    """
    if mode not in MODES:
        raise ValueError(f"chunked_sigmoid_loss: mode={mode!r}; use one of {MODES}.")
    if txt.ndim != 2:
        raise ValueError(f"txt must be [N, D] text embeddings, got shape {tuple(txt.shape)}.")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(
            f"img and txt must hold the same N pairs (image i with text i), got {img.shape[0]} images "
            f"and {txt.shape[0]} texts."
        )
    pair_logits = pair_logits or dot_pair_logits
    t_param, b = jnp.asarray(t_param), jnp.asarray(b)
    if t_param.shape or b.shape:
        raise ValueError(
            f"t_param and b must be scalars, got shapes {t_param.shape} and {b.shape}."
        )
    axes = _resolve_axes(batch_axes) if mode != "dense" else ()
    mesh = jax.sharding.get_abstract_mesh()
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if shards == 1:
        return _dense_loss(pair_logits, img, txt, t_param, b, pair_params)
    if img.shape[0] % shards:
        raise ValueError(
            f"chunked_sigmoid_loss: the batch of {img.shape[0]} is not divisible by the {shards} shards of "
            f"mesh axes {axes}; use a multiple of {shards}."
        )
    loss = _ring_loss if mode == "ring" else _allgather_loss
    return loss(pair_logits, axes, img, txt, t_param, b, pair_params)
