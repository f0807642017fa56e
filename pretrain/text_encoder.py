"""A non-causal text encoder built from the CapPa decoder's blocks, so a CapPa run can initialise it.

The blocks are `decoder.DecoderBlock`s without cross-attention: self-attention over the whole caption
(pad tokens hidden as keys, so padding never changes an embedding) and the MLP. Because the module is
named like the decoder's pieces, a CapPa checkpoint's text tower loads into it by path with no renaming:

    txt/embedding/embedding   [vocab+1, width]   <- CapPa txt/embedding/embedding (the [MASK] row comes along)
    txt/pos_embedding         [1, max_len, width] <- CapPa txt/pos_embedding (posemb="learn")
    txt/decoder/block_{i}/{norm_self_pre,norm_self_post,norm_mlp_pre,self_attn,mlp}/...
                                                  <- the same paths of CapPa's decoder (blocks/... when scanned)
    txt/norm_final/...                            <- CapPa txt/norm_final
    txt/map/...  (pool="map")   txt/proj/kernel   NEW: always initialised here (list them in dont_load)

CapPa's `txt/decoder/block_{i}/{norm_cross_pre,norm_cross_post,cross_attn}` and `txt/head` (the vocab
projection) have no counterpart and are left unused. Pooling: "eos" (the last non-pad token, which is EOS
in our tokenizer convention `tokens..., EOS, pad...`), "last" (the final position, pad or not; big_vision's
"last") or "map" (attention pooling over the non-pad tokens). The projection maps to the joint embedding.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain import decoder, vit

POOLS = ("eos", "last", "map")


class TextEncoder(nn.Module):
    """``TextEncoder(...)(tokens [B, L] int32, train=False) -> [B, embed_dim]`` (not normalised)."""

    vocab_size: int = 32_000
    embed_dim: int = 768
    width: int = 768
    depth: int = 6
    mlp_dim: int | None = None
    num_heads: int = 12
    max_len: int = 64
    norm: str = "layernorm"
    normformer: bool = False
    mlp_type: str = "gelu"
    use_bias: bool = True
    posemb: str = "learn"  # "learn" | "rope"
    pool: str = "eos"  # one of POOLS
    pad_id: int = 0
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    kernels: str = "auto"  # "auto" | "xla" | "cpu" (pretrain/linear.py); same parameters under each

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f"unknown text pool {self.pool!r}; use one of {POOLS}")
        b, length = tokens.shape
        if self.posemb == "learn" and length > self.max_len:
            raise ValueError(
                f"captions of {length} tokens but the text tower's max_len is {self.max_len}: "
                "tokenize with max_len <= model.txt.max_len"
            )
        positions = jnp.broadcast_to(jnp.arange(length)[None], (b, length))
        x = nn.Embed(
            self.vocab_size + 1,  # + CapPa's [MASK] row, so its embedding table loads as it is.
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
            x = x + pe[:, :length].astype(self.dtype)
        elif self.posemb != "rope":
            raise ValueError(f"unknown text posemb {self.posemb!r}; use 'learn' or 'rope'")
        real = tokens != self.pad_id  # [B, L]
        key_mask = real[:, None, None, :]  # Every query may attend to every real token.
        block_kw = dict(
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
            cross_attention=False,
            kernels=self.kernels,
        )
        x = decoder.DecoderStack(
            self.depth, block_kw, self.scan, self.remat_policy, name="decoder"
        )(x, None, key_mask, positions, train, False)
        x = vit.Norm(self.norm, self.use_bias, dtype=self.dtype, name="norm_final")(x)
        if self.pool == "eos":
            last_real = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
            x = jnp.take_along_axis(x, last_real[:, None, None], axis=1)[:, 0]
        elif self.pool == "last":
            x = x[:, -1]
        else:
            heads = self.num_heads
            x = vit.MAPHead(
                heads,
                self.mlp_dim or 4 * self.width,
                self.norm,
                self.mlp_type,
                self.use_bias,
                self.dtype,
                self.kernels,
                name="map",
            )(x, real)
        return nn.Dense(self.embed_dim, use_bias=False, dtype=jnp.float32, name="proj")(
            x.astype(jnp.float32)
        )
