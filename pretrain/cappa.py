"""CapPa: a ViT image tower (``img/...``) and a text decoder (``txt/...``) that cross-attends to all its tokens.

The objective mixes two branches per example (paper: "Image Captioners Are Scalable Vision Learners Too"):

* Cap (probability ``1 - masked_pred_prob``): teacher-forced captioning; the decoder input is the caption
  shifted right by one (start token 0, big_vision's convention) and self-attention is causal.
* Pa (probability ``masked_pred_prob``, 0.75 in the paper): every input token is the [MASK] token and
  self-attention is full, so all tokens are predicted in parallel from the image alone.

Loss: token cross-entropy averaged over each caption's non-pad tokens, then over the batch. The
evaluation loss is Cap only. ``masked_pred_prob=0`` trains a plain captioner (Cap).

Exports the module ``Model``, the functions that build the inputs/loss, and ``model_kwargs`` turning a
config dict into constructor arguments; checkpoint loading lives in ``pretrain/ckpt_import.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pretrain import decoder, vit

START_ID = 0  # First decoder input of a caption (big_vision shifts right with 0).

# Model config defaults: `img` = ViT kwargs (plus `variant`), `txt` = TextDecoder kwargs; `dtype` and
# `kernels` for both.
MODEL_DEFAULTS = dict(
    dtype="float32",  # compute dtype ("bfloat16" on TPU/GPU); parameters are always float32.
    # "auto" | "xla" | "cpu" (pretrain/linear.py): auto = the XLA:CPU rewrites on CPU, plain layers and
    # jax.nn.dot_product_attention elsewhere. The parameters are the same under each.
    kernels="auto",
    keep_registers=True,  # the decoder cross-attends to the registers too (clip-jax's keep_registers)
    img=dict(
        vit.TOWER_DEFAULTS, pool_type="none"
    ),  # the decoder sees every token; probes pool later.
    txt=dict(
        vocab_size=32_000,
        width=None,  # None = the image tower's width
        depth=2,
        mlp_dim=None,
        num_heads=None,  # None = the image tower's
        max_len=64,
        norm="layernorm",
        normformer=False,
        mlp_type="gelu",
        use_bias=True,
        norm_final_bias=None,  # None = use_bias; True for big_vision's decoder_bias=False files
        posemb="learn",  # "learn" (big_vision) | "rope" (the reproduction)
        dropout=0.0,
        scan=False,
        remat_policy="none",
    ),
)


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Model config dict -> ``Model(img_kw=..., txt_kw=...)`` kwargs (variant expanded, widths filled)."""
    dtype = jnp.dtype(model_cfg.get("dtype") or "float32")
    img = vit.config_kwargs(model_cfg["img"], dtype, model_cfg.get("kernels"))
    txt = dict(model_cfg["txt"])
    txt["width"] = txt.get("width") or img["width"]
    txt["num_heads"] = txt.get("num_heads") or img["num_heads"]
    txt["dtype"] = dtype
    txt["kernels"] = img["kernels"]
    return dict(img_kw=img, txt_kw=txt, keep_registers=bool(model_cfg.get("keep_registers", True)))


class Model(nn.Module):
    """``Model(img_kw, txt_kw)(image, tokens, self_mask) -> (logits [B,T,V], img_aux)``."""

    img_kw: Mapping[str, Any]
    txt_kw: Mapping[str, Any]
    keep_registers: bool = True

    def setup(self):
        self.img = vit.ViT(**self.img_kw)
        self.txt = decoder.TextDecoder(**self.txt_kw)

    def encode(self, image, train: bool = False):
        """-> (the encoder tokens the decoder attends to [B, N, E], the ViT's aux dict with all of them).

        All tokens, registers included, unless ``keep_registers=False`` (clip-jax's option): then the patches
        (and class token) only."""
        _, aux = self.img(image, train=train)
        registers = int(self.img_kw.get("num_registers") or 0)
        if self.keep_registers or not registers:
            return aux["encoded"], aux
        return aux["encoded"][:, :-registers], aux

    def decode(self, tokens, encoded, self_mask=None, train: bool = False, decode: bool = False):
        return self.txt(tokens, encoded, self_mask, train=train, decode=decode)

    def __call__(self, image, tokens, self_mask=None, train: bool = False):
        encoded, aux = self.encode(image, train=train)
        return self.decode(tokens, encoded, self_mask, train=train), aux


def shift_right(labels: jax.Array, start_id: int = START_ID) -> jax.Array:
    return jnp.pad(labels, ((0, 0), (1, 0)), constant_values=start_id)[:, :-1]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, T, T] boolean, True where a query may attend (keys at or before it)."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def decoder_inputs(
    labels: jax.Array, is_pa: jax.Array, mask_id: int
) -> tuple[jax.Array, jax.Array]:
    """Decoder input tokens and self-attention mask [B,1,T,T] of each example's branch.

    ``is_pa`` [B] bool: True = parallel prediction (all [MASK] inputs, full attention), False = Cap.
    """
    b, t = labels.shape
    cap = shift_right(labels)
    tokens = jnp.where(is_pa[:, None], jnp.full_like(labels, mask_id), cap)
    mask = jnp.where(is_pa[:, None, None, None], True, causal_mask(t))
    return tokens, jnp.broadcast_to(mask, (b, 1, t, t))


def sequence_xent(
    logits: jax.Array, labels: jax.Array, pad_id: int, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per-example mean token cross-entropy over non-pad tokens, and per-example token count.

    Computed in float32 whatever the compute dtype (the loss is one of the float32 islands). Integer
    labels, never a dense one-hot: over a 32k vocabulary the one-hot's select and multiply passes cost
    ~0.1 s of the S/16 CapPa step on CPU (a profile of benchmarks/cappa_step.py's step). Label smoothing ``a`` (targets
    ``(1 - a) one_hot + a / V``) is exactly ``xent + a * (logit[label] - mean(logits))``.
    """
    logits = logits.astype(jnp.float32)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if label_smoothing:
        picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        token_loss = token_loss + label_smoothing * (picked - jnp.mean(logits, axis=-1))
    weights = (labels != pad_id).astype(jnp.float32)
    count = jnp.sum(weights, axis=-1)
    return jnp.sum(token_loss * weights, axis=-1) / jnp.maximum(count, 1.0), count
