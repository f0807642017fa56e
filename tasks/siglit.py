"""SigLiT: a text tower trained with the sigmoid loss against a frozen image tower; optionally Llip's head.

`config.task = "tasks.siglit"`. Parameters:

    img/...       the image tower (a ViT, loaded with model_init from a CapPa / classify run or a big_vision
                  .npz) and FROZEN: the default config.schedule is [("img/.*", None), (".*", ...)], so the
                  loop computes no gradient and keeps no optimizer state for it (it costs a forward pass).
    img_head/...  (SigLIP) trainable pooling of ALL the tower's tokens, then a projection `img_head/proj`:
                  "map" = attention pooling over every token incl. registers, "registers" = their mean.
                  Not zero-initialised: a zero head gives zero embeddings and NaN gradients through the
                  L2 normalisation.
    txt/...       the text tower (pretrain/text_encoder.py): trained from scratch or initialised from a CapPa
                  decoder's embedding / self-attention / MLP layers (same paths; its docstring lists them).
    t, b          scalars: logits = exp(t) * similarity + b; t starts at log(config.logit_scale_init),
                  b at config.logit_bias_init (SigLIP's 10 and -10). Freeze them with config.schedule.
    llip/...      (model.llip.enabled) Llip's cross-attention mixing the tower's registers with the text as
                  query (tasks/llip.py); there is no img_head then.

Loss: `transfer.sigmoid_loss.chunked_sigmoid_loss` over the global batch (image i's positive is caption i),
split over the mesh's batch axes so no device holds the N x N logits (`config.loss_mode`: "ring",
"allgather" or "dense"). Batches hold `image` [B, H, W, 3] and `labels` [B, L] token ids (the `tokenize` pp
op with config.tokenizer; key `config.text_key`).

What evaluators and the CLI call (all pure functions of `params`, jit them as you like):
    embed_images(params, images [B, H, W, 3]) -> [B, D] L2-normalised, or Llip's mixture tokens [B, K, E]
    embed_texts(params, tokens [N, L] int32)  -> [N, D] L2-normalised
    similarity(params, image_repr, text_emb [N, D]) -> [B, N] cosine similarities (Llip mixes per pair first)
    logits(params, image_repr, text_emb)      -> exp(t) * similarity + b
    text_key, pad_id, text_max_len (the text tower's sequence length), config.tokenizer
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain import cappa, text_encoder, vit
from tasks import llip as llip_lib
from transfer import sigmoid_loss
from transfer.config import ConfigError

IMAGE_HEADS = ("map", "registers")

# Task keys and their defaults (validated: a typo in any of them is an error).
DEFAULTS = dict(
    text_key="labels",
    pad_id=0,
    tokenizer=None,  # SentencePiece .model of the captions; evaluators tokenize prompts with it.
    logit_scale_init=10.0,  # t starts at log(10)
    logit_bias_init=-10.0,
    loss_mode="ring",  # transfer.sigmoid_loss modes: "ring" | "allgather" | "dense"
    # A FILE model_init is a big_vision .npz (CapPa / SigLIP / ViT); a directory is a run of ours.
    # skip: a CapPa run's decoder parts the text encoder has no use for (cross-attention, vocab projection).
    model_load=dict(
        loader="pretrain.ckpt_import:load_into",
        skip=[
            r"txt/decoder/blocks?(_\d+)?/(norm_cross_pre|norm_cross_post|cross_attn)/.*",
            "txt/head/.*",
        ],
    ),
    model=dict(
        dtype="float32",
        kernels="auto",  # "auto" | "xla" | "cpu" for every tower and head (pretrain/linear.py)
        embed_dim=None,  # the joint embedding width; None = the text tower's width
        img=dict(vit.TOWER_DEFAULTS, pool_type="none"),  # the head sees every token
        img_head=dict(
            kind="map", num_heads=None, mlp_dim=None
        ),  # None: the tower's heads, 4 x width
        # The text tower's keys and defaults are the CapPa decoder's (pretrain/cappa.py), plus its pooling.
        txt=dict(
            {k: v for k, v in cappa.MODEL_DEFAULTS["txt"].items() if k != "norm_final_bias"},
            pool="eos",  # "eos" | "last" | "map"
        ),
        llip=dict(enabled=False, num_heads=8, temperature=5.0),  # the paper's M = 8, tau = 5
    ),
    # LiT: the image tower frozen (no gradient, no optimizer state), everything else trained.
    schedule=[("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=0))],
)


class ImageHead(nn.Module):
    """Pools the frozen tower's tokens [B, T, E] and projects them: -> [B, embed_dim] (not normalised)."""

    embed_dim: int
    kind: str = "map"
    num_registers: int = 0
    num_heads: int = 1
    mlp_dim: int | None = None
    norm: str = "layernorm"
    mlp_type: str = "gelu"
    use_bias: bool = True
    kernels: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = tokens.astype(jnp.float32)
        if self.kind == "map":
            mlp_dim = self.mlp_dim or 4 * tokens.shape[-1]
            x = vit.MAPHead(
                self.num_heads,
                mlp_dim,
                self.norm,
                self.mlp_type,
                self.use_bias,
                kernels=self.kernels,
                name="map",
            )(tokens)
        else:  # "registers": they come last in the token layout (pretrain/vit.py).
            x = jnp.mean(tokens[:, -self.num_registers :], axis=1)
        return nn.Dense(self.embed_dim, use_bias=False, name="proj")(x)


class Model(nn.Module):
    """The towers, heads and the scalars t, b; methods are the task's building blocks."""

    img_kw: Mapping[str, Any]
    txt_kw: Mapping[str, Any]
    head_kw: Mapping[str, Any] | None  # None with Llip
    llip_kw: Mapping[str, Any] | None  # None without Llip
    num_registers: int
    logit_scale_init: float
    logit_bias_init: float

    def setup(self):
        self.img = vit.ViT(**self.img_kw)
        self.txt = text_encoder.TextEncoder(**self.txt_kw)
        if self.llip_kw is None:
            self.img_head = ImageHead(**self.head_kw)
        else:
            self.llip = llip_lib.LlipHead(**self.llip_kw)
        self.t = self.param("t", nn.initializers.constant(math.log(self.logit_scale_init)), ())
        self.b = self.param("b", nn.initializers.constant(self.logit_bias_init), ())

    def encode_image(self, image: jax.Array) -> jax.Array:
        _, aux = self.img(image, train=False)  # Frozen: always the inference path (no dropout).
        tokens = aux["encoded"]
        if self.llip_kw is not None:
            return tokens[:, -self.num_registers :].astype(jnp.float32)
        return llip_lib.l2_normalize(self.img_head(tokens))

    def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        return llip_lib.l2_normalize(self.txt(tokens, train=train))

    def similarity(self, image_repr: jax.Array, text_emb: jax.Array) -> jax.Array:
        if self.llip_kw is not None:
            return self.llip(image_repr, text_emb)
        return image_repr @ text_emb.T

    def __call__(self, image: jax.Array, tokens: jax.Array) -> jax.Array:
        """Every parameter's first use (for init): [B, B] similarities."""
        return self.similarity(self.encode_image(image), self.encode_text(tokens))


def model_kwargs(config: Any) -> dict[str, Any]:
    """Config -> `Model` kwargs (widths and heads filled in, choices checked with clear errors)."""
    cfg = config.model
    dtype = jnp.dtype(cfg.get("dtype") or "float32")
    img = vit.config_kwargs(cfg.img, dtype, cfg.get("kernels"))
    txt = dict(cfg.txt)
    txt["width"] = txt.get("width") or img["width"]
    txt["num_heads"] = txt.get("num_heads") or img["num_heads"]
    if txt["pool"] not in text_encoder.POOLS:
        raise ConfigError(
            f"config.model.txt.pool = {txt['pool']!r}: use one of {text_encoder.POOLS}."
        )
    embed_dim = int(cfg.embed_dim or txt["width"])
    txt.update(embed_dim=embed_dim, pad_id=int(config.pad_id), dtype=dtype, kernels=img["kernels"])
    registers = int(img.get("num_registers") or 0)
    head_kw = llip_kw = None
    if cfg.llip.enabled:
        if not registers:
            raise ConfigError(
                "config.model.llip.enabled: Llip mixes the image tower's registers, but "
                "config.model.img.num_registers = 0. Use a tower with registers (e.g. a CapPa run)."
            )
        llip_kw = dict(
            embed_dim=embed_dim,
            num_heads=int(cfg.llip.num_heads),
            temperature=float(cfg.llip.temperature),
        )
    else:
        kind = cfg.img_head.kind
        if kind not in IMAGE_HEADS:
            raise ConfigError(f"config.model.img_head.kind = {kind!r}: use one of {IMAGE_HEADS}.")
        if kind == "registers" and not registers:
            raise ConfigError(
                "config.model.img_head.kind = 'registers' but the tower has no registers "
                "(config.model.img.num_registers = 0): use kind='map'."
            )
        head_kw = dict(
            embed_dim=embed_dim,
            kind=kind,
            num_registers=registers,
            num_heads=int(cfg.img_head.num_heads or img["num_heads"]),
            mlp_dim=cfg.img_head.mlp_dim,
            norm=img["norm"],
            mlp_type=img["mlp_type"],
            use_bias=img["use_bias"],
            kernels=img["kernels"],
        )
    if not config.logit_scale_init > 0:
        raise ConfigError(
            f"config.logit_scale_init = {config.logit_scale_init}: the initial exp(t) must be > 0."
        )
    return dict(
        img_kw=img,
        txt_kw=txt,
        head_kw=head_kw,
        llip_kw=llip_kw,
        num_registers=registers,
        logit_scale_init=float(config.logit_scale_init),
        logit_bias_init=float(config.logit_bias_init),
    )


def _check_tokenizer(config: Any) -> None:
    """A tokenizer with more pieces than the text tower's vocabulary would index past its embedding."""
    if not config.tokenizer:
        return
    from transfer.tokenizer import Tokenizer

    size = Tokenizer(config.tokenizer, pad_id=config.pad_id).vocab_size
    if size > int(config.model.txt.vocab_size):
        raise ConfigError(
            f"config.tokenizer = {config.tokenizer!r} has {size} pieces but config.model.txt.vocab_size "
            f"= {config.model.txt.vocab_size}: set the vocab_size to at least {size}."
        )


class Task:
    """Implements the task contract of docs/ARCHITECTURE.md plus the embedding API evaluators use."""

    def __init__(self, config: Any):
        if config.loss_mode not in sigmoid_loss.MODES:
            raise ConfigError(
                f"config.loss_mode = {config.loss_mode!r}: use one of {sigmoid_loss.MODES}."
            )
        _check_tokenizer(config)
        self.config = config
        self.text_key = config.text_key
        self.pad_id = int(config.pad_id)
        self.text_max_len = int(config.model.txt.max_len)
        kw = model_kwargs(config)
        self.model = Model(**kw)
        self.is_llip = kw["llip_kw"] is not None
        if self.is_llip:
            head = llip_lib.LlipHead(**kw["llip_kw"])
            # One function object, so the loss's custom vjp sees the same static argument every step.
            self._pair_logits = lambda p, img, txt: head.apply({"params": p}, img, txt)
        else:
            self._pair_logits = sigmoid_loss.dot_pair_logits

    # ---------------------------------------------------------------------------------------- embeddings
    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        image = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        tokens = jnp.full((1, batch[self.text_key].shape[1]), self.pad_id, jnp.int32)
        return self.model.init({"params": rng}, image, tokens)["params"]

    def embed_images(self, params: dict, images: jax.Array) -> jax.Array:
        """[B, D] L2-normalised embeddings, or (Llip) the tower's K registers [B, K, E] before mixing."""
        return self.model.apply({"params": params}, images, method="encode_image")

    def embed_texts(
        self, params: dict, tokens: jax.Array, train: bool = False, rng=None
    ) -> jax.Array:
        """[N, D] L2-normalised text embeddings of token ids [N, L] (pad = `pad_id`)."""
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply({"params": params}, tokens, train, method="encode_text", rngs=rngs)

    def similarity(self, params: dict, image_repr: jax.Array, text_emb: jax.Array) -> jax.Array:
        """[B, N] cosine similarities of every image with every text (any B, N)."""
        return self._pair_logits(params.get("llip"), image_repr, text_emb)

    def logits(self, params: dict, image_repr: jax.Array, text_emb: jax.Array) -> jax.Array:
        """[B, N] exp(t) * similarity + b: sigmoid(logits) is the model's match probability."""
        sim = self.similarity(params, image_repr, text_emb)
        return jnp.exp(params["t"]) * sim + params["b"]

    # ---------------------------------------------------------------------------------------- loop
    def loss_fn(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        img = self.embed_images(params, batch["image"])
        txt = self.embed_texts(params, batch[self.text_key], train=True, rng=rng)
        loss = sigmoid_loss.chunked_sigmoid_loss(
            img,
            txt,
            params["t"],
            params["b"],
            pair_logits=self._pair_logits,
            pair_params=params.get("llip"),
            batch_axes=self.config.get("batch_axes"),
            mode=self.config.loss_mode,
        )
        return loss, {"t": jnp.exp(params["t"]), "b": params["b"]}

    def eval_metrics(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        """Per image: its row of the sigmoid loss over the eval batch's real captions, and in-batch
        image->text / text->image top-1 (caption i is image i's). Dense [B, B]: eval batches are small."""
        logits = self.logits(
            params,
            self.embed_images(params, batch["image"]),
            self.embed_texts(params, batch[self.text_key]),
        )
        n = logits.shape[0]
        real = batch["_mask"].astype(bool) if "_mask" in batch else jnp.ones((n,), bool)
        eye = jnp.eye(n, dtype=bool)
        pair_loss = -jax.nn.log_sigmoid(jnp.where(eye, logits, -logits))
        loss = jnp.sum(jnp.where(real[None, :], pair_loss, 0.0), axis=1)
        hide = jnp.finfo(jnp.float32).min
        i2t = jnp.argmax(jnp.where(real[None, :], logits, hide), axis=1) == jnp.arange(n)
        t2i = jnp.argmax(jnp.where(real[:, None], logits, hide), axis=0) == jnp.arange(n)
        return {
            "loss": loss,
            "i2t_top1": i2t.astype(jnp.float32),
            "t2i_top1": t2i.astype(jnp.float32),
        }

    def evaluators(self) -> dict[str, type]:
        """Zero-shot classification and retrieval (tasks/retrieval_eval.py)."""
        from tasks import retrieval_eval  # Lazy: only runs that evaluate pay for its imports.

        return dict(retrieval_eval.EVALUATORS)

    def finalize(self, workdir: str) -> None:
        """WORKDIR/siglit.md: the last value of every evaluator metric as a table, and the run's curves."""
        import os

        from transfer import metrics, plots

        rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        last: dict[str, Any] = {}
        for row in rows:
            for key, value in row.items():
                if "/" in key and not key.startswith(("train/", "input/", "perf/")):
                    last[key] = (row["step"], value)
        table = [
            {"metric": k, "step": step, "value": v}
            for k, (step, v) in sorted(last.items())
            if not k.endswith("seconds")
        ]
        model = self.config.model
        lines = [
            "# SigLiT from a frozen tower",
            "",
            f"- tower (model_init): `{self.config.get('model_init')}`",
            f"- image head: `{model.img_head.kind}`, Llip: `{bool(model.llip.enabled)}`",
            f"- text tower: depth {model.txt.get('depth')}, loaded unless matched by "
            f"`{list(self.config.model_load.get('dont_load', []))}`",
            f"- steps: {self.config.total_steps}, batch {self.config.input.batch_size}",
            "",
            plots.markdown_table(table, ["metric", "step", "value"]),
            "",
        ]
        with open(os.path.join(workdir, "siglit.md"), "w") as f:
            f.write("\n".join(lines))
        plots.plot_run(workdir)
