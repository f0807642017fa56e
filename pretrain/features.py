"""Features of a frozen image tower: a chosen layer and pooling, extracted batched, jitted and sharded, cached on disk.

Probes (few-shot, linear, MAP) read the tower through this module so that they all mean the same thing by
"layer" and "pooling":

  layer    "final"  the encoder's tokens after its final norm (what a CapPa decoder cross-attends to)
           int i    the residual stream after block i (0-based, negative from the end), before any norm
  pooling  "gap" mean of the patch tokens · "registers" mean of the register tokens · "tokens" mean of all
           tokens · "cls" the class token · "map" / "pre_logits" the tower's own pooling head · "none" all
           tokens [B, T, D] (class token, patches, registers in that order)

A cache entry is keyed by the tower's content digest (not its path: a re-trained checkpoint at the same path is
a miss, a copy elsewhere a hit), the data (name, split, data_dir), the pp string, layer, pooling and label key.
Entries are `<key>.npz` (features, labels) plus `<key>.json` (what they are), written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import vit
from transfer import config as config_lib
from transfer import tree

POOLINGS = ("gap", "registers", "tokens", "cls", "map", "pre_logits", "none")
_CACHE_VERSION = 1
# Config keys of a classify/probe model dict that are not ViT constructor arguments.
_NON_VIT_KEYS = ("head_zeroinit",)


def vit_kwargs(config: Any) -> dict[str, Any]:
    """vit.ViT kwargs of a run config: CapPa's `model.img` (+ `model.dtype`, `model.kernels`) or a
    classifier's `model`."""
    model = dict(config["model"])
    if "img" in model:
        return vit.config_kwargs(dict(model["img"]), model.get("dtype"), model.get("kernels"))
    kw = {k: v for k, v in model.items() if k not in _NON_VIT_KEYS}
    return vit.config_kwargs(kw)


def _block_index(layer: Any, depth: int) -> int | None:
    if layer in ("final", None):
        return None
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise config_lib.ConfigError(
            f"layer {layer!r}: use 'final' or a block index in [-{depth}, {depth})."
        ) from None
    if not -depth <= index < depth:
        raise config_lib.ConfigError(f"layer {index} does not exist: the tower has {depth} blocks.")
    return index % depth


def _check_pooling(kw: Mapping[str, Any], block: int | None, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise config_lib.ConfigError(f"pooling {pooling!r}: use one of {POOLINGS}.")
    if pooling == "registers" and not kw.get("num_registers"):
        raise config_lib.ConfigError(
            "pooling='registers' but the tower has no registers (num_registers=0)."
        )
    if pooling == "cls" and kw.get("pool_type") != "tok":
        raise config_lib.ConfigError(
            "pooling='cls' needs a tower with a class token (pool_type='tok')."
        )
    if pooling == "map" and kw.get("pool_type") != "map":
        raise config_lib.ConfigError(
            "pooling='map' reads the tower's own MAP head, and this tower has pool_type="
            f"{kw.get('pool_type')!r}; train a MAP probe instead (tasks/linear_probe.py, head='map')."
        )
    if pooling in ("map", "pre_logits") and block is not None:
        raise config_lib.ConfigError(
            f"pooling={pooling!r} is the tower's own head: it needs layer='final'."
        )


def features_fn(
    vit_kw: Mapping[str, Any], layer: Any = "final", pooling: str = "gap"
) -> Callable[[Any, jax.Array], jax.Array]:
    """fn(img_params, images [B,H,W,3]) -> float32 [B, D] ([B, T, D] for pooling 'none'); pure, jittable.

    An intermediate block runs a tower truncated after it (the later blocks cost nothing); a scanned tower's
    stacked block parameters are sliced to match.
    """
    kw = dict(vit_kw)
    kw.pop("num_classes", None)
    depth = int(kw["depth"])
    block = _block_index(layer, depth)
    _check_pooling(kw, block, pooling)
    if block is not None:
        kw.update(depth=block + 1, final_norm=False)
    model = vit.ViT(**kw)
    prefix = 1 if kw.get("pool_type") == "tok" else 0
    registers = int(kw.get("num_registers") or 0)

    def fn(params: Any, images: jax.Array) -> jax.Array:
        if block is not None and kw.get("scan"):
            blocks = params["encoder"]["blocks"]
            sliced = jax.tree.map(lambda a: a[: block + 1], blocks)
            params = {**params, "encoder": {**params["encoder"], "blocks": sliced}}
        pooled, aux = model.apply({"params": params}, images)
        if pooling in ("map", "pre_logits"):
            return pooled.astype(jnp.float32)
        tokens = aux["encoded"].astype(jnp.float32)
        num_tokens = tokens.shape[1]
        if pooling == "gap":
            return jnp.mean(tokens[:, prefix : num_tokens - registers], axis=1)
        if pooling == "registers":
            return jnp.mean(tokens[:, num_tokens - registers :], axis=1)
        if pooling == "tokens":
            return jnp.mean(tokens, axis=1)
        if pooling == "cls":
            return tokens[:, 0]
        return tokens

    return fn


# ---------------------------------------------------------------------------------------------- towers
@dataclasses.dataclass
class Tower:
    """A frozen image tower: its ViT kwargs, its parameters (the ViT's own tree), where it came from."""

    vit_kw: dict
    params: dict
    source: str
    digest: str
    step: int | None = None


def params_digest(params: Mapping) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes (order-independent of dict insertion)."""
    h = hashlib.sha256()
    for path, leaf in sorted(tree.flatten(params).items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}|{arr.dtype.str}|{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _sub(params: Mapping, subtree: str) -> dict:
    node: Any = params
    for part in [p for p in subtree.split("/") if p]:
        if not isinstance(node, Mapping) or part not in node:
            top = sorted(params) if isinstance(params, Mapping) else []
            raise config_lib.ConfigError(
                f"The checkpoint has no sub-tree {subtree!r}; its top level: {top}."
            )
        node = node[part]
    return dict(node)


def load_tower(
    checkpoint: str,
    *,
    step: int | None = None,
    subtree: str = "img",
    model: Mapping[str, Any] | None = None,
    npz_prefix: str = "",
) -> Tower:
    """The image tower of a `cappa train` workdir (any task with an `img/...` ViT) or of a big_vision `.npz`.

    A workdir brings its own ViT config; a `.npz` needs `model` (a ViT config dict such as classify's `model`)
    and `npz_prefix` for a sub-tree of the file (e.g. "img" in a CapPa or SigLIP checkpoint).
    """
    if os.path.isdir(checkpoint):
        from pretrain import runs

        config = runs.read_config(checkpoint)
        params, step = runs.restore_params(checkpoint, step)
        kw = vit_kwargs(config)
        tower_params = _sub(params, subtree)
    elif os.path.isfile(checkpoint):
        if model is None:
            raise config_lib.InputError(
                f"{checkpoint!r} is a parameter file: pass the tower's ViT config as `model` "
                "(e.g. dict(variant='B/16', pool_type='map')), it is not stored in the file."
            )
        from pretrain import ckpt_import

        kw = vit.config_kwargs({k: v for k, v in dict(model).items() if k not in _NON_VIT_KEYS})
        kw.pop("num_classes", None)
        size = int(dict(model).get("image_size", 224))
        kw.pop("image_size", None)
        init = jax.eval_shape(
            lambda: vit.ViT(**kw).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
        )["params"]
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
        # A classifier's head is not part of the tower a probe reads features from.
        tower_params, _ = ckpt_import.load_into(
            zeros, checkpoint, prefix=npz_prefix, skip=[r"(.*/)?head/(kernel|bias)"]
        )
    else:
        raise config_lib.MissingFileError(
            f"checkpoint {checkpoint!r} does not exist: pass a `cappa train` workdir or a .npz file."
        )
    tower_params = jax.tree.map(np.asarray, tower_params)
    return Tower(kw, tower_params, os.path.abspath(checkpoint), params_digest(tower_params), step)


# ---------------------------------------------------------------------------------------------- extraction
def _data_parallel(fn: Callable, params: Any) -> tuple[Callable, Any, Any]:
    """fn jitted over a 1-D mesh of every device: batch split on 'data', params replicated."""
    from transfer import sharding

    mesh = sharding.make_mesh([("data", -1)])
    batch_sh = sharding.batch_sharding(mesh, ("data",))
    params = jax.device_put(params, sharding.replicated(mesh))
    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch_sh)), params, batch_sh


def compute(
    fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    data: Mapping[str, Any],
    *,
    pp: str,
    batch_size: int = 64,
    label_key: str = "label",
    jitted: tuple[Callable, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, ...], labels [N]) of every example of `data`'s split, in the split's order.

    `jitted` = (jitted fn, batch sharding) lets an evaluator reuse its compiled extraction on the loop's mesh
    with live, possibly sharded params; otherwise the fn is jitted data-parallel over all devices here.
    """
    from transfer import evaluators, input_pipeline, sharding

    if jitted is None:
        step_fn, params, batch_sh = _data_parallel(fn, params)
    else:
        step_fn, batch_sh = jitted
    batches = input_pipeline.eval_batches({"data": dict(data), "pp": pp}, batch_size=batch_size)
    count = jax.process_count()
    feats, labels, masks = [], [], []
    start, done = time.monotonic(), 0
    for batch in batches:
        if label_key not in batch or "image" not in batch:
            raise config_lib.ConfigError(
                f"pp {pp!r} must produce 'image' and {label_key!r}; it gives {sorted(batch)}."
            )
        # Kept on device until the end: dispatch is asynchronous, so the tower runs while the
        # input pipeline prepares the next batch.
        feats.append(
            step_fn(params, sharding.put_batch({"image": batch["image"]}, batch_sh)["image"])
        )
        labels.append(evaluators.gather(np.asarray(batch[label_key]), per_host=True))
        masks.append(evaluators.gather(batch["_mask"], per_host=True))
        done += 1
        if done % 20 == 0:
            rate = done * batch_size / (time.monotonic() - start)
            print(
                f"  features: {done}/{batches.num_batches} batches, {rate:.1f} images/s", flush=True
            )
    if not feats:
        raise config_lib.ConfigError(f"{dict(data)} produced no examples.")
    # Rows are [batch][host][local row]; the split's order is host slices one after another.
    feats = [evaluators.gather(x, per_host=True) for x in feats]
    order = lambda xs: np.concatenate([np.concatenate([x[h] for x in xs]) for h in range(count)])
    keep = order(masks) > 0
    return order(feats)[keep], order(labels)[keep].astype(np.int64)


@dataclasses.dataclass
class FeatureSet:
    features: np.ndarray  # float32 [N, D] (or [N, T, D] for pooling "none")
    labels: np.ndarray  # int64 [N]
    key: str
    cached: bool  # True when read from the cache (no tower forward pass ran)


def cache_key(
    tower: Tower, data: Mapping[str, Any], pp: str, layer: Any, pooling: str, label_key: str
) -> tuple[str, dict]:
    """(hex key, the JSON-able record it hashes)."""
    record = dict(
        version=_CACHE_VERSION,
        tower=tower.digest,
        data={k: data.get(k) for k in ("name", "split", "data_dir")},
        pp=pp,
        layer=str(layer),
        pooling=pooling,
        label_key=label_key,
    )
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]
    return key, record


def extract(
    tower: Tower,
    data: Mapping[str, Any],
    *,
    pp: str,
    layer: Any = "final",
    pooling: str = "gap",
    batch_size: int = 64,
    label_key: str = "label",
    cache_dir: str | None = None,
) -> FeatureSet:
    """Features of every example of `data`'s split (file order); read from / written to `cache_dir` if set."""
    data = {k: data[k] for k in ("name", "split", "data_dir") if data.get(k) is not None}
    key, record = cache_key(tower, data, pp, layer, pooling, label_key)
    path = os.path.join(cache_dir, key) if cache_dir else None
    if path and os.path.isfile(path + ".npz"):
        with np.load(path + ".npz", allow_pickle=False) as f:
            return FeatureSet(f["features"], f["labels"], key, True)
    fn = features_fn(tower.vit_kw, layer, pooling)
    start = time.monotonic()
    feats, labels = compute(
        fn, tower.params, data, pp=pp, batch_size=batch_size, label_key=label_key
    )
    seconds = time.monotonic() - start
    if path and jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp + ".npz", "wb") as f:
            np.savez(f, features=feats, labels=labels)
        record.update(source=tower.source, step=tower.step, shape=list(feats.shape))
        record.update(images_per_second=round(len(feats) / max(seconds, 1e-9), 2))
        with open(tmp + ".json", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp + ".json", path + ".json")
        os.replace(tmp + ".npz", path + ".npz")  # Last: an .npz only exists complete.
    return FeatureSet(feats, labels, key, False)


# ---------------------------------------------------------------------------------------------- input source
SOURCE_KEYS = (
    "source",
    "name",
    "split",
    "data_dir",
    "checkpoint",
    "step",
    "subtree",
    "model",
    "npz_prefix",
    "layer",
    "pooling",
    "pp",
    "cache_dir",
    "label_key",
    "batch_size",
)
_LOADED: dict[str, FeatureSet] = {}


class CachedSource:
    """`input.data.source = "pretrain.features:CachedSource"`: a split's cached tower features as the loop's input.

    Raw examples are {"features", label_key} in the split's file order, so a probe trained on them sees the same
    examples in the same order as one that runs the frozen tower live on the same split and seed. Extracted on
    first use (cache miss), then read from `cache_dir`.
    """

    def __init__(self, data_cfg: Mapping[str, Any]):
        cfg = dict(data_cfg)
        unknown = sorted(set(cfg) - set(SOURCE_KEYS))
        if unknown:
            raise config_lib.ConfigError(
                f"Unknown input.data keys {unknown} for CachedSource; valid: {SOURCE_KEYS}."
            )
        for needed in ("name", "split", "checkpoint", "pp"):
            if not cfg.get(needed):
                raise config_lib.ConfigError(f"CachedSource needs input.data.{needed}.")
        self.label_key = cfg.get("label_key") or "label"
        memo = json.dumps(cfg, sort_keys=True, default=str)
        if memo not in _LOADED:  # Evaluators re-open their source every run.
            tower = load_tower(
                cfg["checkpoint"],
                step=cfg.get("step"),
                subtree=cfg.get("subtree") or "img",
                model=cfg.get("model"),
                npz_prefix=cfg.get("npz_prefix") or "",
            )
            _LOADED[memo] = extract(
                tower,
                cfg,
                pp=cfg["pp"],
                layer=cfg.get("layer", "final"),
                pooling=cfg.get("pooling") or "gap",
                batch_size=int(cfg.get("batch_size") or 64),
                label_key=self.label_key,
                cache_dir=cfg.get("cache_dir"),
            )
        self.features = _LOADED[memo]

    def _range(self, index: int, count: int) -> range:
        n = len(self.features.labels)
        return range(index * n // count, (index + 1) * n // count)

    def num_examples(self, index: int = 0, count: int = 1) -> int:
        return len(self._range(index, count))

    def dataset(self, index: int = 0, count: int = 1) -> Any:
        import tensorflow as tf

        rows = self._range(index, count)
        return tf.data.Dataset.from_tensor_slices(
            {
                "features": self.features.features[rows.start : rows.stop],
                self.label_key: self.features.labels[rows.start : rows.stop],
            }
        )
