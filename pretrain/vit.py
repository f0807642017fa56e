"""One ViT encoder for both the big_vision family and the CapPa reproduction family.

big_vision family (the defaults): LayerNorm, pre-norm blocks, GELU MLP, biases, learnt position
embeddings, pooling ``gap`` | ``map`` | ``tok`` | ``none``.

CapPa reproduction family: ``norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False,
num_registers=N`` (usually ``pool_type="none"``).

Token layout of ``aux["encoded"]``: ``[cls (tok only), patches..., registers...]``.
Position embeddings cover the patches (and the class token when ``pool_type="tok"`` and
``cls_posemb``, as in the original ViT); registers never get one.
Pooling: ``gap`` averages the patch tokens only (registers are excluded: they are scratch space,
not image content, and excluding them keeps gap features comparable with and without registers);
``map`` attends over all tokens, registers included (the learnt probe can ignore them); ``tok``
takes the class token; ``none`` returns all tokens.
A classifier head (``num_classes``) always has a bias, whatever ``use_bias`` says for the tower.

Parameter paths (stable; regex rules for freezing/sharding/loading rely on them)::

    embedding/{kernel,bias}  pos_embedding  cls  registers
    encoder/block_{i}/{norm_attn_pre,norm_attn_post,norm_mlp_pre}/{scale,bias}
    encoder/block_{i}/attn/{query,key,value,out}/{kernel,bias}
    encoder/block_{i}/mlp/{wi,wo}/...            (gelu)
    encoder/block_{i}/mlp/{wi_0,wi_1,norm_mid,wo}/...  (geglu; gelu(wi_0 x) * wi_1 x)
    encoder/blocks/...   same tree with a leading depth axis when ``scan=True``
    encoder/norm_final/...   map/{probe,attn,norm,mlp}/...   head/{kernel,bias}

``norm_attn_post`` and ``mlp/norm_mid`` exist only with ``normformer=True``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain import linear
from transfer.sharding import constrain_batch

_VARIANTS = {  # name: (width, depth, mlp_dim, num_heads)
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

# The ViT keys of a task's `model` config (validated key by key; tasks override single values): `variant`
# (e.g. "B/16" sets width/depth/mlp_dim/num_heads/patch_size) and the `ViT` fields with their defaults (added
# below the class), except the tower's size: a small default one.
CONFIG_DEFAULTS: dict[str, Any] = dict(variant=None, width=192, depth=4, num_heads=3, patch_size=8)


def config_kwargs(
    model_cfg: Mapping[str, Any], dtype: Any = None, kernels: str | None = None
) -> dict[str, Any]:
    """A task's ViT config dict -> ``ViT`` kwargs (``variant`` expanded, compute dtype resolved).

    ``dtype`` and ``kernels`` (a two-tower model's ``model.dtype`` / ``model.kernels``) win over the dict's.
    """
    kw = dict(model_cfg)
    variant = kw.pop("variant", None)
    if variant:
        kw.update(decode_variant(variant))
    kw["dtype"] = jnp.dtype(dtype or kw.get("dtype") or "float32")
    kw["kernels"] = kernels or kw.get("kernels") or "auto"
    linear.resolve(kw["kernels"])  # a typo fails here, not at the first trace
    return kw


REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def decode_variant(variant: str) -> dict[str, Any]:
    """``"B/16"`` -> dict(width, depth, mlp_dim, num_heads, patch_size=(16, 16))."""
    name, _, patch = variant.partition("/")
    if name not in _VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(_VARIANTS)}")
    width, depth, mlp_dim, num_heads = _VARIANTS[name]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        out["patch_size"] = (int(patch), int(patch))
    return out


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-d sin-cos position embedding, shape [1, h*w, width] (row-major token order).

    Frequencies span [1, 1/temperature] inclusive, as in big_vision and MoCo v3, so towers trained there
    (no position parameter to load) compute the same embedding here.
    """
    if width % 4:
        raise ValueError(f"sincos2d posemb needs width divisible by 4, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return emb[None].astype(np.float32)


class Norm(nn.Module):
    """LayerNorm or RMSNorm, always computed in float32; the result is cast to ``dtype``."""

    kind: str = "layernorm"  # "layernorm" | "rmsnorm"
    use_bias: bool = True  # LayerNorm only; RMSNorm never has a bias
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
            y = y * scale
            if self.use_bias:
                y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        elif self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
            y = y * scale
        else:
            raise ValueError(f"unknown norm {self.kind!r}")
        return y.astype(self.dtype)


def dot_product_attention(
    q, k, v, mask, dtype, kernels: str = "auto", need_probs: bool = True
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention with logits and softmax in float32 (bf16 logits lose ranking precision).

    q [B,Q,H,D], k/v [B,K,H,D], mask broadcastable to [B,H,Q,K] (True = may attend) or None.
    Returns (out [B,Q,H,D] in ``dtype``, probs [B,H,Q,K] float32). ``kernels`` picks the implementation
    (`linear.ops`); probs may be None when not ``need_probs`` (the "xla" kernels then skip them).
    """
    return linear.ops(kernels).attention(q, k, v, mask, dtype, need_probs)


class Attention(nn.Module):
    """Multi-head attention; logits and softmax in float32. Kernels: [width, heads, head_dim].

    The attention probabilities are sown as ``intermediates/.../attention`` when the caller makes
    ``intermediates`` mutable: that is how attention maps are read out (under any ``kernels``).
    """

    num_heads: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, xq, xkv, mask=None):
        """``mask``: broadcastable to [B, heads, Q, K], True = may attend; None attends everywhere."""
        width = xq.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} not divisible by num_heads {self.num_heads}")
        hd = width // self.num_heads
        ops = linear.ops(self.kernels)
        dense = lambda name: nn.DenseGeneral(
            (self.num_heads, hd),
            dot_general=ops.dot_general,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )
        q, k, v = dense("query")(xq), dense("key")(xkv), dense("value")(xkv)
        need_probs = self.is_mutable_collection("intermediates")
        y, probs = ops.attention(q, k, v, mask, self.dtype, need_probs)
        if need_probs:
            self.sow("intermediates", "attention", probs)
        return nn.DenseGeneral(
            width,
            dot_general=ops.dot_general,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)


class MlpBlock(nn.Module):
    """GELU MLP (``wi``, ``wo``) or GeGLU (``gelu(wi_0 x) * wi_1 x``, then ``wo``).

    With ``normformer``, a norm (``norm_mid``) is applied to the hidden activation before ``wo``.
    """

    mlp_dim: int
    mlp_type: str = "gelu"
    use_bias: bool = True
    normformer: bool = False
    norm: str = "layernorm"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        ops = linear.ops(self.kernels)
        dense = lambda feats, name: nn.Dense(
            feats,
            dot_general=ops.dot_general,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            name=name,
        )
        if self.mlp_type == "gelu":
            h = ops.gelu(dense(self.mlp_dim, "wi")(x))
        elif self.mlp_type == "geglu":
            h = ops.gelu(dense(self.mlp_dim, "wi_0")(x)) * dense(self.mlp_dim, "wi_1")(x)
        else:
            raise ValueError(f"unknown mlp_type {self.mlp_type!r}")
        if self.normformer:
            h = Norm(self.norm, self.use_bias, dtype=self.dtype, name="norm_mid")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(x.shape[-1], "wo")(h)


class Block(nn.Module):
    """Pre-norm transformer block (optionally with Normformer's extra norms)."""

    num_heads: int
    mlp_dim: int
    norm: str = "layernorm"
    normformer: bool = False
    mlp_type: str = "gelu"
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: Norm(self.norm, self.use_bias, dtype=self.dtype, name=name)
        barrier = linear.ops(self.kernels).grad_barrier
        x = barrier(x)
        y = norm("norm_attn_pre")(x)
        y = Attention(self.num_heads, self.use_bias, self.dtype, self.kernels, name="attn")(y, y)
        if self.normformer:
            y = norm("norm_attn_post")(y)
        x = constrain_batch(x + nn.Dropout(self.dropout)(y, deterministic=not train))
        x = barrier(x)
        y = norm("norm_mlp_pre")(x)
        y = MlpBlock(
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
        x = constrain_batch(x + nn.Dropout(self.dropout)(y, deterministic=not train))
        return x, None  # (carry, per-layer output) so that the block can be nn.scan'ed


class Encoder(nn.Module):
    depth: int
    block_kwargs: Mapping[str, Any]
    scan: bool = False
    remat_policy: str = "none"
    final_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        block_cls = Block
        if self.remat_policy != "none":
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(
                    f"unknown remat_policy {self.remat_policy!r}; "
                    f"known: none, {', '.join(REMAT_POLICIES)}"
                )
            block_cls = nn.remat(
                Block,
                prevent_cse=not self.scan,
                static_argnums=(2,),
                policy=REMAT_POLICIES[self.remat_policy],
            )
        if self.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0},
                in_axes=nn.broadcast,
                split_rngs={"params": True, "dropout": True},
                length=self.depth,
            )
            x, _ = stack(**self.block_kwargs, name="blocks")(x, train)
        else:
            for i in range(self.depth):
                x, _ = block_cls(**self.block_kwargs, name=f"block_{i}")(x, train)
        if not self.final_norm:
            return x
        kw = self.block_kwargs
        return Norm(kw["norm"], kw["use_bias"], dtype=kw["dtype"], name="norm_final")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learnt probe attends over the tokens, then a residual MLP.

    ``mask`` [B, T] bool (True = a real token) hides padding tokens from the probe, so a batch of
    token sequences padded to one length pools exactly like each sequence alone.
    """

    num_heads: int
    mlp_dim: int
    norm: str = "layernorm"
    mlp_type: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, mask=None):
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.tile(probe.astype(self.dtype), (x.shape[0], 1, 1))
        if mask is not None:
            mask = jnp.asarray(mask, bool)[:, None, None, :]  # [B, T] -> [B, heads, Q, T]
        attn = Attention(self.num_heads, self.use_bias, self.dtype, self.kernels, name="attn")
        x = attn(probe, x, mask)
        y = Norm(self.norm, self.use_bias, dtype=self.dtype, name="norm")(x)
        mlp = MlpBlock(
            self.mlp_dim,
            self.mlp_type,
            self.use_bias,
            dtype=self.dtype,
            kernels=self.kernels,
            name="mlp",
        )
        return (x + mlp(y))[:, 0]


class ViT(nn.Module):
    """Vision Transformer. ``ViT(...)(image [B,H,W,C], train=False) -> (out, aux)``."""

    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None  # default 4 * width
    num_heads: int = 12
    patch_size: int | tuple[int, int] = 16
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    normformer: bool = False
    mlp_type: str = "gelu"  # "gelu" | "geglu"
    use_bias: bool = True
    num_registers: int = 0
    pool_type: str = "gap"  # "gap" | "map" | "tok" | "none"
    posemb: str = "learn"  # "learn" | "sincos2d"
    cls_posemb: bool = True  # tok + learn: the class token gets a position embedding too
    dropout: float = 0.0
    num_classes: int | None = None
    head_zeroinit: bool = True
    scan: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32  # compute dtype; params are always float32
    # False: aux["encoded"] is the raw residual stream (probes of an intermediate block read it).
    final_norm: bool = True
    kernels: str = "auto"  # "auto" | "xla" | "cpu" (pretrain/linear.py); same parameters under each

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        aux = {}
        ph, pw = (self.patch_size,) * 2 if isinstance(self.patch_size, int) else self.patch_size
        mlp_dim = self.mlp_dim or 4 * self.width
        x = nn.Conv(
            self.width,
            (ph, pw),
            strides=(ph, pw),
            padding="VALID",
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="embedding",
        )(image)
        b, h, w, _ = x.shape
        x = aux["stem"] = jnp.reshape(x, (b, h * w, self.width))

        tok = self.pool_type == "tok"
        if tok:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
            cls = jnp.tile(cls.astype(self.dtype), (b, 1, 1))
        if self.posemb == "learn":
            n = h * w + (1 if tok and self.cls_posemb else 0)
            pe = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                (1, n, self.width),
            )
            pe = pe.astype(self.dtype)
            if tok and self.cls_posemb:
                cls, pe = cls + pe[:, :1], pe[:, 1:]
            x = x + pe
        elif self.posemb == "sincos2d":
            x = x + jnp.asarray(posemb_sincos_2d(h, w, self.width), self.dtype)
        else:
            raise ValueError(f"unknown posemb {self.posemb!r}")
        parts = [cls, x] if tok else [x]
        if self.num_registers:
            reg = self.param(
                "registers",
                nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                (1, self.num_registers, self.width),
            )
            parts.append(jnp.tile(reg.astype(self.dtype), (b, 1, 1)))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else x
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        block_kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=mlp_dim,
            norm=self.norm,
            normformer=self.normformer,
            mlp_type=self.mlp_type,
            use_bias=self.use_bias,
            dropout=self.dropout,
            dtype=self.dtype,
            kernels=self.kernels,
        )
        x = aux["encoded"] = Encoder(
            self.depth, block_kwargs, self.scan, self.remat_policy, self.final_norm, name="encoder"
        )(x, train)

        first = 1 if tok else 0
        if self.pool_type == "gap":
            x = jnp.mean(x[:, first : first + h * w], axis=1)
        elif self.pool_type == "map":
            x = MAPHead(
                self.num_heads,
                mlp_dim,
                self.norm,
                self.mlp_type,
                self.use_bias,
                self.dtype,
                self.kernels,
                name="map",
            )(x)
        elif tok:
            x = x[:, 0]
        elif self.pool_type != "none":
            raise ValueError(f"unknown pool_type {self.pool_type!r}")
        aux["pre_logits"] = x

        if self.num_classes:
            init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
            x = aux["logits"] = nn.Dense(
                self.num_classes,
                kernel_init=init,
                dtype=jnp.float32,
                dot_general=linear.ops(self.kernels).dot_general,
                name="head",
            )(x)
        return x, aux


# ViT fields the task sets (or derives), never config keys.
_NOT_CONFIG = ("num_classes", "head_zeroinit", "dtype", "final_norm", "parent", "name")
CONFIG_DEFAULTS.update(
    (f.name, f.default)
    for f in dataclasses.fields(ViT)
    if f.name not in (*CONFIG_DEFAULTS, *_NOT_CONFIG) and f.default is not dataclasses.MISSING
)
# The keys of a two-tower model's image tower (`model.img`): `kernels` is the model's (`model.kernels`).
TOWER_DEFAULTS = {k: v for k, v in CONFIG_DEFAULTS.items() if k != "kernels"}


def _stack_dicts(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def scan_to_unscanned(params: Mapping[str, Any]) -> dict[str, Any]:
    """Split every ``blocks`` subtree (leading depth axis) into ``block_0 .. block_{depth-1}``.

    Works on the ViT params or on any tree containing them (e.g. ``{"img": vit_params}``).
    """
    out = {}
    for key, value in params.items():
        if key == "blocks" and isinstance(value, Mapping):
            depth = jax.tree.leaves(value)[0].shape[0]
            for i in range(depth):
                out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], dict(value))
        elif isinstance(value, Mapping):
            out[key] = scan_to_unscanned(value)
        else:
            out[key] = value
    return out


def unscanned_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stack ``block_0 .. block_{depth-1}`` subtrees into one ``blocks`` subtree (the inverse)."""
    out, blocks = {}, {}
    for key, value in params.items():
        m = re.fullmatch(r"block_(\d+)", key)
        if m and isinstance(value, Mapping):
            blocks[int(m.group(1))] = dict(value)
        elif isinstance(value, Mapping):
            out[key] = unscanned_to_scan(value)
        else:
            out[key] = value
    if blocks:
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"non-contiguous block indices: {sorted(blocks)}")
        out["blocks"] = _stack_dicts([blocks[i] for i in range(len(blocks))])
    return out
