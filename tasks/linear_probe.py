"""Trained linear and MAP probes on a frozen image tower, with a weight-decay sweep trained in one run.

`config.task = "tasks.linear_probe"`. The head is `nn.vmap`ped over `wd_sweep`: head h has its own parameters
(a leading sweep axis on every leaf, `head/classifier/kernel` [S, D, C]) and its own L2 strength, and the loss is

    sum_h ( mean cross-entropy of head h  +  0.5 * wd_h * ||kernels of head h||^2 )

so the gradient of head h depends on head h alone: with an element-wise optimizer (sgd, momentum, adam, adamw,
lion) every head trains exactly as if it ran alone. Anything that mixes heads would break that, so the task
refuses it: global-norm clipping (`grad_clip_norm` scales every head by the norm of all of them), the engine's
decoupled `wd` (the same decay for every head, on top of the sweep) and factored or orthogonalising optimizers.
"linear" is a Dense layer on pooled features; "map" is a multi-head attention-pooling head (a learnt query over
all tokens, registers included; `vit.MAPHead`) followed by a Dense layer. The L2 term covers every `kernel` of a
head (the classifier's and, for "map", the attention and MLP kernels), not biases, norms or the query.

Two input modes, decided by the batch:
  live    batch["image"]: the frozen tower `img/...` (config.model, loaded from config.model_init) runs forward
          and `features` (layer, pooling) picks what the head sees; config.schedule must freeze `img/.*`.
  cached  batch["features"] [B, D] (or tokens [B, T, D] with an optional batch["features_mask"] [B, T]), from
          input.data.source = "pretrain.features:CachedSource": no tower parameters at all; the tower is
          input.data.checkpoint and its layer / pooling are input.data.layer / pooling.
The `probe` evaluator (tasks/probe_eval.py) picks the head on a validation split and reports on the test split;
`finalize` writes WORKDIR/probe.md and probe.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pretrain import features, vit
from tasks import probe_eval
from tasks.probe_eval import wd_label
from transfer import tree
from transfer.config import ConfigError

# Optimizers whose update of a parameter element depends on that element's gradient history alone.
ELEMENTWISE_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "lion")

# Task keys and their defaults (validated: a typo in any of them is an error). The engine keys set here
# (`wd`, `grad_clip_norm`) change the engine's defaults to the ones a probe needs.
DEFAULTS = dict(
    num_classes=10,
    label_key="label",
    head="linear",  # "linear" | "map"
    wd_sweep=(0.0, 1e-5, 1e-4, 1e-3, 1e-2),  # L2 strengths, one head each, all trained at once.
    # Live mode: what the frozen tower feeds the head (pretrain/features.py); "map" needs pooling="none".
    features=dict(layer="final", pooling="gap"),
    # MAP head size; None: the tower's num_heads (config.model) and an MLP 4 x the feature width.
    map_head=dict(num_heads=None, mlp_dim=None),
    model_load=dict(loader="pretrain.ckpt_import:load_into", dont_load=["head/.*"]),
    model=dict(vit.CONFIG_DEFAULTS, cls_posemb=False, dtype="float32"),  # The tower (live mode).
    wd=0.0,  # Must stay 0: the sweep's L2 term is the weight decay.
    grad_clip_norm=None,  # Must stay off: global-norm clipping couples the heads.
)  # Live mode also needs config.schedule = [("img/.*", None), (".*", dict(...))]: the tower stays frozen.


class ProbeHead(nn.Module):
    """One probe: [MAP pooling over tokens ->] Dense. The classifier starts at zero (uniform logits)."""

    num_classes: int
    kind: str = "linear"  # "linear" | "map"
    num_heads: int = 1
    mlp_dim: int | None = None
    kernels: str = "auto"  # the MAP head's (config.model.kernels, pretrain/linear.py)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if self.kind == "map":
            mlp_dim = self.mlp_dim or 4 * x.shape[-1]
            x = vit.MAPHead(self.num_heads, mlp_dim, kernels=self.kernels, name="map")(x, mask)
        dense = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="classifier")
        return dense(x.astype(jnp.float32))


def sweep_heads(size: int, **head_kw: Any) -> nn.Module:
    """`size` independent ProbeHeads (params stacked on axis 0); (x, mask) -> logits [S, B, C]."""
    stacked = nn.vmap(
        ProbeHead,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(None, None),
        out_axes=0,
        axis_size=size,
    )
    return stacked(**head_kw, name="head")


def _check_sweep(wd_sweep: Any) -> tuple[float, ...]:
    if isinstance(wd_sweep, (int, float)):
        wd_sweep = (wd_sweep,)
    wds = tuple(float(w) for w in wd_sweep or ())
    if not wds or any(not math.isfinite(w) or w < 0 for w in wds):
        raise ConfigError(
            f"config.wd_sweep = {wd_sweep!r}: give one or more finite L2 strengths >= 0."
        )
    labels = [wd_label(w) for w in wds]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"config.wd_sweep = {wd_sweep!r} repeats a value: each head needs its own."
        )
    return wds


def check_config(config: Any) -> None:
    """Refuses settings that would make the heads of the sweep influence each other."""
    if config.get("grad_clip_norm"):
        raise ConfigError(
            f"config.grad_clip_norm = {config.grad_clip_norm}: global-norm clipping scales every head by the "
            "norm of all heads together, so the wd sweep's heads would not train independently. "
            "Set config.grad_clip_norm = None."
        )
    if config.get("wd"):
        raise ConfigError(
            f"config.wd = {config.wd}: the probe's weight decay is the L2 term of config.wd_sweep; the "
            "engine's decoupled decay would add the same decay to every head. Set config.wd = 0."
        )
    if config.optax_name not in ELEMENTWISE_OPTIMIZERS:
        raise ConfigError(
            f"config.optax_name = {config.optax_name!r} does not update each parameter element on its own "
            f"gradients, which couples the heads of the wd sweep; use one of {ELEMENTWISE_OPTIMIZERS}."
        )
    if config.head not in ("linear", "map"):
        raise ConfigError(f"config.head = {config.head!r}: use 'linear' or 'map'.")
    if int(config.num_classes) < 2:
        raise ConfigError(
            f"config.num_classes = {config.num_classes}: a classifier needs >= 2 classes."
        )


def _check_tower_frozen(config: Any, img_params: Mapping) -> None:
    """Every `img/...` parameter must be frozen by config.schedule (the first matching rule wins)."""
    sched = config.schedule
    rules = (
        tree.check_rules(sched, "schedule") if isinstance(sched, (list, tuple)) else [(".*", sched)]
    )
    trainable = [
        f"img/{p}"
        for p in tree.flatten(img_params)
        if tree.first_match(f"img/{p}", rules, 0) is not None
    ]
    if trainable:
        raise ConfigError(
            f"config.schedule trains {len(trainable)} tower parameter(s), e.g. {trainable[:2]}: a probe "
            "keeps the tower frozen. Put ('img/.*', None) first in config.schedule."
        )


class Task:
    """Implements the task contract of docs/ARCHITECTURE.md (plus `finalize`)."""

    def __init__(self, config: Any):
        check_config(config)
        self.config = config
        self.label_key = config.label_key
        self.num_classes = int(config.num_classes)
        self.wd_sweep = _check_sweep(config.wd_sweep)
        self.vit_kw = features.vit_kwargs(config)
        self._features_fn = None  # Built on the first live batch (cached runs need no tower).
        # The MAP head as built (None = mlp_dim 4 x the feature width); linear heads ignore it.
        self.map_kw = dict(
            num_heads=int(config.map_head.num_heads or self.vit_kw["num_heads"]),
            mlp_dim=config.map_head.mlp_dim,
            kernels=self.vit_kw["kernels"],
        )
        self.heads = sweep_heads(
            len(self.wd_sweep), num_classes=self.num_classes, kind=config.head, **self.map_kw
        )

    # ------------------------------------------------------------------------------------------ features
    def tower_features(self, img_params: Any, image: jax.Array) -> jax.Array:
        """The frozen tower's features of a batch of images (live mode), as config.features says."""
        if self._features_fn is None:
            cfg = self.config.features
            self._features_fn = features.features_fn(self.vit_kw, cfg.layer, cfg.pooling)
        return jax.lax.stop_gradient(self._features_fn(img_params, image))

    def _inputs(self, params: Mapping, batch: Mapping) -> tuple[jax.Array, jax.Array | None]:
        """(features [B, D] or tokens [B, T, D], token mask [B, T] or None) of a batch in either mode."""
        if "features" in batch:
            feats, mask = jnp.asarray(batch["features"], jnp.float32), batch.get("features_mask")
        elif "image" in batch:
            if "img" not in params:
                raise ValueError(
                    "The batch holds images but the params hold no tower `img/...`: a run initialised on "
                    "cached features cannot take images."
                )
            feats, mask = self.tower_features(params["img"], batch["image"]), None
        else:
            raise ValueError(
                f"A probe batch needs 'image' (live tower) or 'features' (cached); it has {sorted(batch)}."
            )
        want = 3 if self.config.head == "map" else 2
        if feats.ndim != want:
            hint = (
                "the MAP head attends over tokens: use pooling='none'"
                if want == 3
                else "a linear head needs pooled features: use a pooling other than 'none', or head='map'"
            )
            raise ValueError(
                f"Features of shape {feats.shape} for head={self.config.head!r}: {hint}."
            )
        return feats, mask

    def head_logits(self, params: Mapping, batch: Mapping) -> jax.Array:
        """Logits of every head of the sweep: [S, B, C]."""
        feats, mask = self._inputs(params, batch)
        return self.heads.apply({"params": params["head"]}, feats, mask)

    # ------------------------------------------------------------------------------------------ contract
    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        # Fixed sub-keys: the heads start the same whether the tower runs live or features are cached.
        img_rng, head_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
        params: dict[str, Any] = {}
        if "features" in batch:
            if self.config.model_init:
                raise ConfigError(
                    f"config.model_init = {self.config.model_init!r} with cached features: there is no "
                    "tower to load (the tower is input.data.checkpoint). Unset config.model_init."
                )
            probe = {"features": jnp.zeros((1, *batch["features"].shape[1:]), jnp.float32)}
            if "features_mask" in batch:
                probe["features_mask"] = jnp.ones(probe["features"].shape[:2], bool)
        elif "image" in batch:
            image = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
            params["img"] = vit.ViT(**self.vit_kw).init(img_rng, image)["params"]
            _check_tower_frozen(self.config, params["img"])
            shape = jax.eval_shape(self.tower_features, params["img"], image).shape
            probe = {"features": jnp.zeros(shape, jnp.float32)}
        else:
            probe = batch  # _inputs names the missing keys.
        feats, mask = self._inputs({}, probe)  # Also checks the shape against the head kind.
        if self.config.head == "map" and feats.shape[-1] % self.map_kw["num_heads"]:
            raise ConfigError(
                f"Features of width {feats.shape[-1]} do not split into "
                f"{self.map_kw['num_heads']} attention heads: set config.map_head.num_heads."
            )
        params["head"] = self.heads.init({"params": head_rng}, feats, mask)["params"]
        return params

    def sweep_terms(
        self, params: Mapping, batch: Mapping
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(logits [S, B, C], mean cross-entropy [S], L2 penalty 0.5 * wd * ||kernels||^2 [S]) per head."""
        logits = self.head_logits(params, batch)
        labels = jnp.broadcast_to(batch[self.label_key], logits.shape[:2])
        xent = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), axis=1)
        kernels = [v for p, v in tree.flatten(params["head"]).items() if p.endswith("kernel")]
        sq_norm = sum(jnp.sum(jnp.square(k), axis=tuple(range(1, k.ndim))) for k in kernels)
        return logits, xent, 0.5 * jnp.asarray(self.wd_sweep, jnp.float32) * sq_norm

    def loss_fn(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """The SUM over heads of each head's loss: head h's gradient is its own loss's gradient."""
        del rng  # Deterministic: no dropout in a probe.
        logits, xent, l2 = self.sweep_terms(params, batch)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch[self.label_key][None], axis=1)
        metrics = {"xent": jnp.mean(xent), "accuracy": jnp.mean(accuracy)}
        for wd, acc in zip(self.wd_sweep, accuracy, strict=True):
            metrics[f"accuracy/{wd_label(wd)}"] = acc
        return jnp.sum(xent + l2), metrics

    def eval_metrics(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        """Per-example top-1 of every head (for a plain `mean` evaluator)."""
        logits = self.head_logits(params, batch)
        correct = (jnp.argmax(logits, -1) == batch[self.label_key][None]).astype(jnp.float32)
        return {f"prec@1/{wd_label(wd)}": c for wd, c in zip(self.wd_sweep, correct, strict=True)}

    def evaluators(self) -> dict[str, type]:
        return {"probe": probe_eval.ProbeEvaluator}

    def finalize(self, workdir: str) -> None:
        """WORKDIR/probe.md and probe.json: the final `probe` numbers and the protocol record."""
        probe_eval.write_report(workdir, self)
