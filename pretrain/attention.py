"""Attention maps: read the attention weights of chosen layers and draw them over the image.

Every attention module sows its probabilities (``intermediates/.../attention``, [B, heads, queries, keys]);
making ``intermediates`` mutable is all it takes to read them, with no cost when nobody asks.

* encoder self-attention: ``patches -> register r`` (how much each patch attends to a register) and
  ``register r -> patches`` (where a register looks), as in the CapPa reproduction's register maps;
* decoder cross-attention: for each caption token, its attention over the image patches.

``cappa attention --checkpoint WORKDIR IMAGE [--caption TEXT] [--layer -1] [--out DIR]`` writes one PNG per
image: the image, the register maps of the chosen encoder layer and the cross-attention of each token of
the caption (greedy-decoded when no caption is given).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import cappa
from transfer import config as config_lib


def per_layer(stack: Mapping[str, Any], module: str) -> list[jax.Array]:
    """Sown attention of ``module`` ("attn", "self_attn", "cross_attn") in each layer of an encoder or
    decoder stack's intermediates, in layer order (looped ``block_{i}`` or scanned ``blocks``)."""
    if "blocks" in stack:  # scanned: one array with a leading layer axis
        stacked = stack["blocks"][module]["attention"][0]
        return [stacked[i] for i in range(stacked.shape[0])]
    index = sorted(int(k.split("_")[1]) for k in stack if re.fullmatch(r"block_\d+", k))
    return [stack[f"block_{i}"][module]["attention"][0] for i in index]


def num_layers(stack: Mapping[str, Any]) -> int:
    """Layers of an encoder or decoder stack's parameters (looped ``block_{i}`` or scanned ``blocks``)."""
    if "blocks" in stack:
        return int(jax.tree.leaves(stack["blocks"])[0].shape[0])
    return sum(1 for k in stack if re.fullmatch(r"block_\d+", k))


def check_layer(layer: int, params: Mapping[str, Any]) -> None:
    """``--layer`` indexes both the encoder and the decoder: an InputError naming the valid range if it is out."""
    enc, dec = num_layers(params["img"]["encoder"]), num_layers(params["txt"]["decoder"])
    n = min(enc, dec)
    if not -n <= layer < n:
        raise config_lib.InputError(
            f"--layer {layer} is out of range: the encoder has {enc} layers and the decoder {dec}; "
            f"pass a layer in {-n}..{n - 1} (negative counts from the last)"
        )


def capture(model: Any, params: Any, images: jax.Array, tokens: jax.Array | None = None) -> dict:
    """-> {"encoder": [layers][B,H,N,N]} and, with caption ``tokens`` [B,T] (labels: pieces, EOS, pad),
    {"cross": [layers][B,H,T,N]} of the teacher-forced Cap branch (query t = predicting token t)."""

    def run(params, images, tokens):
        if tokens is None:
            _, state = model.apply(
                {"params": params}, images, method=cappa.Model.encode, mutable=["intermediates"]
            )
        else:
            is_pa = jnp.zeros((tokens.shape[0],), bool)
            inputs, mask = cappa.decoder_inputs(tokens, is_pa, model.txt_kw["vocab_size"])
            _, state = model.apply(
                {"params": params}, images, inputs, mask, mutable=["intermediates"]
            )
        return state["intermediates"]

    inter = jax.jit(run)(params, images, tokens)
    out = {"encoder": per_layer(inter["img"]["encoder"], "attn")}
    if tokens is not None:
        out["cross"] = per_layer(inter["txt"]["decoder"], "cross_attn")
    return out


def register_maps(layer_attn: jax.Array, grid: tuple[int, int], num_registers: int) -> dict:
    """From one encoder layer [B,H,N,N] (tokens: patches then registers), head-averaged maps [B,R,gh,gw]:
    ``to_register`` = attention of every patch to register r; ``from_register`` = register r over patches."""
    gh, gw = grid
    n = gh * gw
    attn = jnp.mean(layer_attn.astype(jnp.float32), axis=1)  # [B,N,N]
    to_reg = attn[:, :n, n : n + num_registers]  # [B, patches, R]
    from_reg = attn[:, n : n + num_registers, :n]  # [B, R, patches]
    b = attn.shape[0]
    return {
        "to_register": jnp.transpose(to_reg, (0, 2, 1)).reshape(b, num_registers, gh, gw),
        "from_register": from_reg.reshape(b, num_registers, gh, gw),
    }


def cross_maps(layer_attn: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Decoder cross-attention [B,H,T,N] -> head-averaged attention over the patches [B,T,gh,gw]."""
    gh, gw = grid
    attn = jnp.mean(layer_attn.astype(jnp.float32), axis=1)[:, :, : gh * gw]
    return attn.reshape(attn.shape[0], attn.shape[1], gh, gw)


def overlay_png(image: np.ndarray, maps: list[np.ndarray], titles: list[str], path: str) -> str:
    """Writes the image and each map (upsampled to the image, drawn over it) as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.clip((np.asarray(image) + 1) / 2, 0, 1)  # pp value_range(-1, 1) -> [0, 1]
    cols = min(len(maps) + 1, 6)
    rows = -(-(len(maps) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("image", fontsize=8)
    h, w = image.shape[:2]
    for ax, m, title in zip(list(axes.flat)[1 : len(maps) + 1], maps, titles, strict=True):
        ax.imshow(image)
        ax.imshow(
            np.asarray(m), cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear"
        )
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cappa attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir of a CapPa run")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--caption", default=None, help="caption to attend with (default: greedy)")
    parser.add_argument(
        "--layer", type=int, default=-1, help="encoder/decoder layer (default last)"
    )
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/attention)")
    args = parser.parse_args(argv)
    try:
        return _attention_command(args)
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


def _attention_command(args: argparse.Namespace) -> int:
    from pretrain import decode, runs

    run = runs.load_run(args.checkpoint)
    runs.require_captioner(run)
    model, params = run.task.model, run.params
    check_layer(args.layer, params)
    size = runs.image_size(params, run.config)
    images = runs.load_images(args.images, size)
    grid = (images.shape[1] // _patch(model)[0], images.shape[2] // _patch(model)[1])
    if args.caption is not None:
        if run.tokenizer is None:
            raise config_lib.InputError(
                "the run's config has no tokenizer; cannot tokenize --caption (omit it to attend "
                "with the greedy caption)"
            )
        tokens = run.tokenizer.encode([args.caption] * len(images), model.txt_kw["max_len"])
    else:
        out = decode.generate(
            model,
            params,
            images,
            max_len=model.txt_kw["max_len"],
            eos_id=_eos(run),
            pad_id=_pad(run),
        )
        tokens = np.asarray(out["tokens"][:, 0])
    maps = capture(model, params, images, jnp.asarray(tokens))
    reg = register_maps(maps["encoder"][args.layer], grid, model.img_kw.get("num_registers", 0))
    cross = cross_maps(maps["cross"][args.layer], grid)
    out_dir = args.out or os.path.join(args.checkpoint, "attention")
    for i, path in enumerate(args.images):
        pieces = _pieces(run, tokens[i])
        panels = [np.asarray(cross[i, t]) for t in range(len(pieces))]
        titles = [f"'{p}'" for p in pieces]
        for r in range(reg["from_register"].shape[1]):
            panels += [np.asarray(reg["from_register"][i, r]), np.asarray(reg["to_register"][i, r])]
            titles += [f"register {r} -> image", f"image -> register {r}"]
        name = os.path.splitext(os.path.basename(path))[0] + "_attention.png"
        written = overlay_png(np.asarray(images[i]), panels, titles, os.path.join(out_dir, name))
        print(json.dumps({"image": path, "caption": " ".join(pieces), "png": written}))
    return 0


def _patch(model: Any) -> tuple[int, int]:
    p = model.img_kw["patch_size"]
    return (p, p) if isinstance(p, int) else tuple(p)


def _eos(run: Any) -> int:
    return run.tokenizer.eos_id if run.tokenizer is not None else 1


def _pad(run: Any) -> int:
    """The tokenizer's pad id, else the task's (``pad_id`` of the CapPa config), else generate's 0."""
    return (
        run.tokenizer.pad_id if run.tokenizer is not None else int(getattr(run.task, "pad_id", 0))
    )


def _pieces(run: Any, ids: np.ndarray) -> list[str]:
    """The caption's tokens up to and including EOS, as text pieces (ids when no tokenizer)."""
    eos = _eos(run)
    ids = [int(t) for t in ids]
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids
    if run.tokenizer is None:
        return [str(t) for t in ids]
    return [run.tokenizer.processor.id_to_piece(t) if t != eos else "</s>" for t in ids]
