"""The CapPa text decoder: self-attention, cross-attention to ALL encoder tokens, MLP; KV-cached decoding.

Two block families, like the ViT: big_vision's (LayerNorm with bias, GELU MLP with bias) and the CapPa
reproduction's (``norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False``). Attention
projections never have a bias (in both families); the vocab projection ``head`` is the only layer that
always has one, and it starts at zero so the first loss is exactly ln(vocab_size).

Inputs are token ids in ``[0, vocab_size]``: id ``vocab_size`` is the [MASK] token of parallel prediction
(an extra embedding row, as in big_vision, so a user's tokenizer needs no spare id). Positions are
learnt (``pos_embedding``, big_vision) or rotary (``rope``, the reproduction).

Decoding keeps a cache (flax collection ``cache``): ``prefill`` (``encoded`` given) computes each
layer's cross-attention keys/values once and writes the self-attention keys/values of the first
tokens; ``step`` (``encoded=None``) appends one token per call. Every cache leaf has the batch on
axis 0 (scanned layers stack on axis 1), so beam search can reorder caches with one ``take``.

Parameter paths::

    txt/embedding/embedding [vocab+1, width]      txt/pos_embedding [1, max_len, width] (learn)
    txt/decoder/block_{i}/{norm_self_pre,norm_self_post,norm_cross_pre,norm_cross_post,norm_mlp_pre}
    txt/decoder/block_{i}/{self_attn,cross_attn}/{query,key,value,out}/kernel
    txt/decoder/block_{i}/mlp/...        (as the ViT's MLP)
    txt/decoder/blocks/...               (scan=True: leading depth axis)
    txt/norm_final   txt/head/{kernel,bias}

``*_post`` norms exist only with ``normformer=True``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain import linear, vit
from transfer.sharding import constrain_batch


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of x [B,T,H,D] at integer positions [B,T] (rotate-half form)."""
    half = x.shape[-1] // 2
    freq = 1.0 / base ** (np.arange(half, dtype=np.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B,T,1,half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class DecoderAttention(nn.Module):
    """Multi-head attention without biases; self-attention caches keys/values when decoding."""

    num_heads: int
    max_len: int
    cross: bool = False
    rope: bool = False
    dtype: Any = jnp.float32
    kernels: str = "auto"

    def _dense(self, name: str, hd: int) -> nn.Module:
        return nn.DenseGeneral(
            (self.num_heads, hd),
            dot_general=linear.ops(self.kernels).dot_general,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )

    @nn.compact
    def __call__(self, x, kv_input, mask, positions, decode: bool):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"decoder width {width} not divisible by num_heads {self.num_heads}")
        hd = width // self.num_heads
        q = self._dense("query", hd)(x)
        if self.cross:
            k, v = self._cross_kv(kv_input, hd, decode)
        else:
            k, v = self._dense("key", hd)(x), self._dense("value", hd)(x)
            if self.rope:
                q, k = rope(q, positions), rope(k, positions)
            if decode:
                k, v, mask = self._update_cache(k, v, positions)
        need_probs = self.is_mutable_collection("intermediates")
        y, probs = vit.dot_product_attention(q, k, v, mask, self.dtype, self.kernels, need_probs)
        if need_probs:
            self.sow("intermediates", "attention", probs)
        return nn.DenseGeneral(
            width,
            dot_general=linear.ops(self.kernels).dot_general,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)

    def _cross_kv(self, encoded, hd: int, decode: bool):
        if not decode:
            return self._dense("key", hd)(encoded), self._dense("value", hd)(encoded)
        if encoded is not None:  # prefill: project the image tokens once and keep them.
            k, v = self._dense("key", hd)(encoded), self._dense("value", hd)(encoded)
            self.variable("cache", "cached_key", lambda: k).value = k
            self.variable("cache", "cached_value", lambda: v).value = v
            return k, v
        if not self.has_variable("cache", "cached_key"):
            raise ValueError("decode step before prefill: call the decoder with `encoded` first")
        return self.variable("cache", "cached_key").value, self.variable(
            "cache", "cached_value"
        ).value

    def _update_cache(self, k, v, positions):
        """Writes k/v [B,T,H,D] at positions[:, 0]; returns the whole cache and its causal mask."""
        b, t, h, d = k.shape
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, self.max_len, h, d), k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, self.max_len, h, d), v.dtype)
        start = positions[0, 0]
        ck.value = jax.lax.dynamic_update_slice(
            ck.value, k.astype(ck.value.dtype), (0, start, 0, 0)
        )
        cv.value = jax.lax.dynamic_update_slice(
            cv.value, v.astype(cv.value.dtype), (0, start, 0, 0)
        )
        mask = jnp.arange(self.max_len)[None, None, None, :] <= positions[:, None, :, None]
        return ck.value, cv.value, mask


class DecoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    max_len: int
    norm: str = "layernorm"
    normformer: bool = False
    mlp_type: str = "gelu"
    use_bias: bool = True
    rope: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    # False: no cross-attention sub-layer (and no parameters for it): a text ENCODER block whose
    # self-attention and MLP have the decoder's parameter paths, so a CapPa decoder can initialise it.
    cross_attention: bool = True
    kernels: str = "auto"  # pretrain/linear.py

    @nn.compact
    def __call__(self, x, encoded, self_mask, positions, train: bool, decode: bool):
        norm = lambda name: vit.Norm(self.norm, self.use_bias, dtype=self.dtype, name=name)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        attn = lambda name, cross: DecoderAttention(
            self.num_heads,
            self.max_len,
            cross,
            self.rope and not cross,
            self.dtype,
            self.kernels,
            name=name,
        )
        barrier = linear.ops(self.kernels).grad_barrier
        sublayers = (
            (("self", None), ("cross", encoded)) if self.cross_attention else (("self", None),)
        )
        for kind, kv in sublayers:
            x = barrier(x)
            y = norm(f"norm_{kind}_pre")(x)
            mask = self_mask if kind == "self" else None
            y = attn(f"{kind}_attn", kind == "cross")(y, kv, mask, positions, decode)
            if self.normformer:
                y = norm(f"norm_{kind}_post")(y)
            x = constrain_batch(x + drop(y))
        x = barrier(x)
        y = norm("norm_mlp_pre")(x)
        y = vit.MlpBlock(
            self.mlp_dim,
            self.mlp_type,
            self.use_bias,
            self.normformer,
            self.norm,
            self.dropout,
            self.dtype,
            self.kernels,
            name="mlp",
        )(y, train)
        return constrain_batch(x + drop(y)), None


class TextDecoder(nn.Module):
    """``TextDecoder(...)(tokens [B,T], encoded [B,N,E], self_mask, train, decode) -> logits [B,T,V]``.

    ``self_mask`` (broadcastable to [B,1,T,T], True = may attend) is ignored when decoding (the cache
    builds its own causal mask). ``encoded`` is None for decode steps after the prefill.
    """

    vocab_size: int = 32_000
    width: int = 768
    depth: int = 6
    mlp_dim: int | None = None
    num_heads: int = 12
    max_len: int = 64
    norm: str = "layernorm"
    normformer: bool = False
    mlp_type: str = "gelu"
    use_bias: bool = True
    # big_vision's decoder/LayerNorm keeps its bias even with decoder_bias=False; None = use_bias.
    norm_final_bias: bool | None = None
    posemb: str = "learn"  # "learn" | "rope"
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    kernels: str = "auto"  # "auto" | "xla" | "cpu" (pretrain/linear.py); same parameters under each

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @nn.compact
    def __call__(self, tokens, encoded, self_mask=None, *, train=False, decode=False):
        b, t = tokens.shape
        if decode:  # position of the first new token = number of tokens already cached.
            index = self.variable("cache", "index", jnp.zeros, (b,), jnp.int32)
            positions = index.value[:, None] + jnp.arange(t)[None]
            index.value = index.value + t
        else:
            positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        x = nn.Embed(
            self.vocab_size + 1,
            self.width,
            embedding_init=nn.initializers.normal(stddev=1.0),
            name="embedding",
        )(tokens).astype(self.dtype)
        if self.posemb == "learn":
            pe = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                (1, self.max_len, self.width),
            )
            x = x + jnp.take(pe[0], positions, axis=0).astype(self.dtype)
        elif self.posemb != "rope":
            raise ValueError(f"unknown decoder posemb {self.posemb!r}; use 'learn' or 'rope'")
        if encoded is not None:
            encoded = encoded.astype(self.dtype)
        x = DecoderStack(
            self.depth, self._block_kwargs(), self.scan, self.remat_policy, name="decoder"
        )(x, encoded, None if decode else self_mask, positions, train, decode)
        final_bias = self.use_bias if self.norm_final_bias is None else self.norm_final_bias
        x = vit.Norm(self.norm, final_bias, dtype=self.dtype, name="norm_final")(x)
        logits = linear.Dense(
            self.vocab_size,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            kernels=self.kernels,
            name="head",
        )(x)
        return logits.astype(jnp.float32)

    def _block_kwargs(self) -> dict[str, Any]:
        return dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            max_len=self.max_len,
            norm=self.norm,
            normformer=self.normformer,
            mlp_type=self.mlp_type,
            use_bias=self.use_bias,
            rope=self.posemb == "rope",
            dropout=self.dropout,
            dtype=self.dtype,
            kernels=self.kernels,
        )


class DecoderStack(nn.Module):
    """The blocks, looped (``block_{i}``) or scanned (``blocks``, with remat when training)."""

    depth: int
    block_kwargs: dict[str, Any]
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x, encoded, self_mask, positions, train: bool, decode: bool):
        block_cls = DecoderBlock
        if self.remat_policy != "none" and not decode:
            if self.remat_policy not in vit.REMAT_POLICIES:
                raise ValueError(f"unknown remat_policy {self.remat_policy!r}")
            block_cls = nn.remat(
                DecoderBlock,
                prevent_cse=not self.scan,
                static_argnums=(5, 6),
                policy=vit.REMAT_POLICIES[self.remat_policy],
            )
        args = (encoded, self_mask, positions, train, decode)
        if self.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0, "cache": 1},
                in_axes=nn.broadcast,
                split_rngs={"params": True, "dropout": True},
                length=self.depth,
            )
            return stack(**self.block_kwargs, name="blocks")(x, *args)[0]
        for i in range(self.depth):
            x, _ = block_cls(**self.block_kwargs, name=f"block_{i}")(x, *args)
        return x
