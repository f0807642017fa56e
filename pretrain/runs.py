"""Loading a finished (or running) training run for inference tools: `cappa caption`, notebooks, evaluators.

A workdir written by `transfer.train` holds `config.json` and `checkpoints/<step>/{params,train,input}`.
`load_run` rebuilds the task from the config and restores only the `params` item, as host numpy arrays
(unsharded: inference on one machine does not need the training mesh, and the checkpoint's own
shardings may name devices this process does not have).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from transfer import checkpoint, registry, tree
from transfer import config as config_lib


@dataclasses.dataclass
class LoadedRun:
    """A run's config, its task object (with `.model`), its parameters and its tokenizer (or None)."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    task: Any
    params: dict
    tokenizer: Any  # transfer.tokenizer.Tokenizer, or None when config.tokenizer is unset.


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """`workdir/config.json`, completed with today's defaults (keys added since the run was made)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise config_lib.MissingFileError(
            f"{workdir!r} has no config.json: pass the --workdir of a `cappa train` run."
        )
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    from transfer import train  # Heavy (TF input pipeline): imported only when a run is loaded.

    config, _ = train.prepare_config(config)
    return config


def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of a workdir (orbax never lists a half-written one)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    mngr = checkpoint.manager(ckpt_dir, read_only=True)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def restore_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """(params as numpy arrays, step) of the latest or the given checkpoint of `workdir`."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise config_lib.MissingFileError(
            f"{workdir!r} holds no complete checkpoint (no {os.path.join(workdir, 'checkpoints')} "
            "step directory): train longer than config.ckpt_steps, or pick another workdir."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise config_lib.InputError(
            f"{workdir!r} has no checkpoint at step {step}; available steps: {steps}."
        )
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        meta = mngr.item_metadata(step)["params"]
        meta = meta.tree if hasattr(meta, "tree") else meta
        flat = tree.flatten(meta)
        item = tree.unflatten({p: np.zeros(m.shape, m.dtype) for p, m in flat.items()})
        as_numpy = tree.unflatten(
            {p: checkpoint.ocp.RestoreArgs(restore_type=np.ndarray) for p in flat}
        )
        restore = checkpoint.ocp.args.PyTreeRestore(item=item, restore_args=as_numpy)
        params = mngr.restore(step, args=checkpoint.ocp.args.Composite(params=restore))["params"]
    finally:
        mngr.close()
    return tree.unflatten(tree.flatten(params)), int(step)


def load_run(workdir: str, step: int | None = None, tokenizer_path: str | None = None) -> LoadedRun:
    """Config, task, params (latest checkpoint unless `step`) and tokenizer of a `cappa train` workdir.

    The tokenizer is `tokenizer_path`, else `config.tokenizer`; None if neither is set.
    """
    config = read_config(workdir)
    params, step = restore_params(workdir, step)
    task = registry.import_task(config.task).Task(config)
    tokenizer = None
    path = tokenizer_path or config.get("tokenizer")
    if path:
        from transfer.tokenizer import Tokenizer

        tokenizer = Tokenizer(path)
    return LoadedRun(os.path.abspath(workdir), step, config, task, params, tokenizer)


def image_size(params: dict, config: Any = None) -> int:
    """The square resolution the image tower was trained at.

    From the learnt position embedding (grid of patches x patch size); a tower without one
    (sincos positions) falls back to the last `resize(N)` of `config.input.pp`.
    """
    img = params.get("img", {})
    pos = img.get("pos_embedding")
    kernel = img.get("embedding", {}).get("kernel")
    if pos is not None and kernel is not None:
        n = int(pos.shape[1])
        for tokens in (n, n - 1):  # n - 1: a class token with its own position embedding.
            side = math.isqrt(max(tokens, 0))
            if side > 0 and side * side == tokens:
                if kernel.shape[0] != kernel.shape[1]:
                    break
                return side * int(kernel.shape[0])
    pp = str(config.input.pp) if config is not None else ""
    sizes = re.findall(r"resize\((\d+)\)", pp)
    if sizes:
        return int(sizes[-1])
    raise config_lib.InputError(
        "Cannot tell the image resolution of this model (no square learnt position embedding and no "
        "`resize(N)` in config.input.pp): pass it explicitly (e.g. --image_size 224)."
    )


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
    """float32 [N, size, size, 3] in [-1, 1]: RGB, bilinear resize (as the `resize` pp op)."""
    from PIL import Image, UnidentifiedImageError

    out = np.zeros((len(paths), size, size, 3), np.float32)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                pixels = im.convert("RGB").resize((size, size), Image.BILINEAR)
        except FileNotFoundError:
            raise config_lib.MissingFileError(f"image {path!r} does not exist.") from None
        except (UnidentifiedImageError, OSError) as e:
            raise config_lib.InputError(f"cannot read image {path!r}: {e}") from None
        out[i] = np.asarray(pixels, np.float32) / 127.5 - 1.0
    return out


def require_captioner(run: LoadedRun) -> None:
    """Caption/attention commands need a CapPa run; anything else gets a clear error, not an AttributeError."""
    if not hasattr(run.task, "model") or not hasattr(run.task.model, "txt_kw"):
        raise config_lib.InputError(
            f"{run.workdir!r} is a {run.config.task!r} run, not a CapPa captioner: pass a CapPa workdir."
        )
