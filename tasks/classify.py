"""Image classification: a ViT tower (`img/...`) and a linear head (`head/...`), trained with softmax cross-entropy.

Full fine-tune by default; freeze the tower with `config.schedule = [("img/.*", None), (".*", dict(...))]`: the loop
then computes no gradient for it. The first task, and the proof that the loop works end to end.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pretrain import vit

# Task keys and their defaults (validated: a typo in any of them is an error).
DEFAULTS = dict(
    num_classes=10,
    label_key="label",
    label_smoothing=0.0,
    # A FILE model_init is a big_vision .npz: set model_load.dst_subtree="img" (and src_subtree="img"
    # for a CapPa/SigLIP checkpoint). A directory is another run of ours, loaded by the engine.
    model_load=dict(loader="pretrain.ckpt_import:load_into"),
    model=dict(
        vit.CONFIG_DEFAULTS,
        cls_posemb=False,  # big_vision's convention: the class token gets no position embedding.
        dtype="float32",
        head_zeroinit=True,
    ),
)


def vit_kwargs(model_cfg: Any) -> dict[str, Any]:
    """Config dict -> ViT constructor kwargs (`variant` expanded, dtype resolved)."""
    kw = dict(model_cfg)
    kw.pop("head_zeroinit", None)
    return vit.config_kwargs(kw)


class Classifier(nn.Module):
    num_classes: int
    vit_kw: dict
    head_zeroinit: bool = True

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        features, aux = vit.ViT(**self.vit_kw, name="img")(image, train=train)
        init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
        logits = nn.Dense(self.num_classes, kernel_init=init, name="head")(
            features.astype(jnp.float32)
        )
        return logits, aux


class Task:
    """Implements the task contract of docs/ARCHITECTURE.md."""

    def __init__(self, config: Any):
        self.config = config
        self.label_key = config.label_key
        self.num_classes = int(config.num_classes)
        self.model = Classifier(
            self.num_classes,
            vit_kwargs(config.model),
            head_zeroinit=bool(config.model.head_zeroinit),
        )

    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        image = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        return self.model.init({"params": rng}, image)["params"]

    def logits(self, params: dict, image: jax.Array, train: bool = False, rng=None) -> jax.Array:
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply({"params": params}, image, train=train, rngs=rngs)[0]

    def _xent(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        onehot = jax.nn.one_hot(labels, self.num_classes)
        if self.config.label_smoothing:
            onehot = optax.smooth_labels(onehot, self.config.label_smoothing)
        return optax.softmax_cross_entropy(logits, onehot)

    def loss_fn(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = self.logits(params, batch["image"], train=True, rng=rng)
        labels = batch[self.label_key]
        loss = jnp.mean(self._xent(logits, labels))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"accuracy": accuracy}

    def eval_metrics(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        logits = self.logits(params, batch["image"])
        labels = batch[self.label_key]
        top5 = jnp.any(jax.lax.top_k(logits, min(5, self.num_classes))[1] == labels[:, None], -1)
        return {
            "loss": self._xent(logits, labels),
            "prec@1": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "prec@5": top5.astype(jnp.float32),
        }
