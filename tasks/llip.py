"""Llip's caption-conditioned image embedding (seed 004, "Modeling Caption Diversity in Contrastive
Vision-Language Pretraining"): the image tower's K mixture tokens mixed by a cross-attention whose query is
the text.

For image i with mixture tokens h_i [K, E] and text j with embedding g_j [D], per head m (M heads of width
D / M):  q_j^m = g_j W_Q^m,  k_i^mk = h_i^k W_K^m,  v_i^mk = h_i^k W_V^m,
         w_ij^m = softmax_k(q_j^m . k_i^mk / (sqrt(D / M) * tau)),
         z_ij = concat_m(sum_k w_ij^mk v_i^mk) W_O,      similarity_ij = <z_ij / |z_ij|, g_j>.
Equation (1) of the paper divides the logits by tau, so a larger tau mixes more uniformly and tau -> inf
(or a zero query) gives the plain average of the tokens: z_i = mean_k(h_i^k) W_V W_O, independent of the
text. (The paper's prose says a larger tau sharpens; we follow the equation.) The 1/sqrt(D / M) is the
usual attention scaling. Where the paper queries with the text tower's output before its projection W_T,
the query here is the normalised text embedding itself, so that `similarity(image_repr, text_emb)` needs
nothing but the two embeddings (evaluators and the chunked loss pass exactly those).

The tokens are the frozen tower's registers (the paper's mixture tokens are registers too); W_Q, W_K, W_V,
W_O are trainable (`llip/{query,key,value,out}/kernel`), xavier-initialised, no bias. None starts at zero: a
zero W_O would give zero embeddings and NaN gradients through the normalisation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


class LlipHead(nn.Module):
    """``LlipHead(embed_dim, num_heads, temperature)(tokens [B, K, E], text [N, D]) -> similarity [B, N]``.

    ``method="mixing_weights"`` returns the softmax weights [B, N, M, K] (for tests and attention maps).
    """

    embed_dim: int
    num_heads: int = 8
    temperature: float = 5.0

    def setup(self):
        d, m = self.embed_dim, self.num_heads
        if d % m:
            raise ValueError(
                f"Llip: the embedding width {d} is not divisible by llip.num_heads={m}; pick a divisor."
            )
        if not self.temperature > 0:
            raise ValueError(f"Llip: llip.temperature must be > 0, got {self.temperature}.")
        hd = d // m
        dense = lambda name, axis=-1, features=(m, hd): nn.DenseGeneral(
            features,
            axis=axis,
            use_bias=False,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )
        self.query, self.key, self.value = dense("query"), dense("key"), dense("value")
        self.out = dense("out", axis=(-2, -1), features=d)

    def mixing_weights(self, tokens: jax.Array, text: jax.Array) -> jax.Array:
        q = self.query(text.astype(jnp.float32))  # [N, M, hd]
        k = self.key(tokens.astype(jnp.float32))  # [B, K, M, hd]
        scale = 1.0 / (np.sqrt(q.shape[-1]) * self.temperature)
        logits = jnp.einsum("nmh,bkmh->bnmk", q, k) * scale
        return jax.nn.softmax(logits, axis=-1)

    def mixed(self, tokens: jax.Array, text: jax.Array) -> jax.Array:
        """The caption-conditioned image embeddings z_ij [B, N, D] (not normalised)."""
        v = self.value(tokens.astype(jnp.float32))  # [B, K, M, hd]
        mix = jnp.einsum("bnmk,bkmh->bnmh", self.mixing_weights(tokens, text), v)
        return self.out(mix)

    def __call__(self, tokens: jax.Array, text: jax.Array) -> jax.Array:
        if tokens.ndim != 3 or text.ndim != 2:
            raise ValueError(
                f"Llip needs mixture tokens [B, K, E] and text embeddings [N, D], got "
                f"{tuple(tokens.shape)} and {tuple(text.shape)}."
            )
        z = l2_normalize(self.mixed(tokens, text))
        return jnp.einsum("bnd,nd->bn", z, text.astype(jnp.float32))
