"""big_vision's ViT format: reading its ``.npz`` files, its names -> ours, position embeddings, export.

Why a converter: CapPa, SigLIP and the plain big_vision ViTs are published as ``.npz`` files keyed by big_vision's
flattened parameter paths (``Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel``). Our ViT with the big_vision
family settings computes the same function but names its parameters differently (``encoder/block_0/mlp/wi/kernel``),
so loading is a renaming plus three real conversions:

* big_vision's scanned layout (``Transformer/encoderblock/...``, leading depth axis) is split into layers, and
  stacked again when the target model is scanned itself (``encoder/blocks/...``);
* a position embedding of another patch grid is resampled bilinearly (corners aligned, as big_vision's own
  ``scipy.ndimage.zoom(order=1)``), so fine-tuning at another resolution starts where big_vision would;
* big_vision adds position embeddings to the patches only; the class token gets none, so a ``tok`` model loading
  such a checkpoint must use ``cls_posemb=False`` (checked, with an explanation).

Files are read with ``allow_pickle=False`` only: an ``.npz`` may hold pickled objects, and unpickling runs code.
Loading (matching, stacking, the mismatch report) is pretrain/ckpt_import.py's, for every format.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from transfer import tree
from transfer.config import InputError

# big_vision module path -> ours. Leaf names (kernel, bias, scale) and array layouts are the same on both sides:
# attention kernels are [width, heads, head_dim] and out is [heads, head_dim, width] in both.
_TOP = {
    "embedding": "embedding",
    "pos_embedding": "pos_embedding",
    "cls": "cls",
    "Transformer/encoder_norm": "encoder/norm_final",
    "MAPHead_0/probe": "map/probe",
    "MAPHead_0/MultiHeadDotProductAttention_0": "map/attn",
    "MAPHead_0/LayerNorm_0": "map/norm",
    "MAPHead_0/MlpBlock_0/Dense_0": "map/mlp/wi",
    "MAPHead_0/MlpBlock_0/Dense_1": "map/mlp/wo",
    "head": "head",
}
_BLOCK = {  # inside one encoder block
    "LayerNorm_0": "norm_attn_pre",
    "MultiHeadDotProductAttention_0": "attn",
    "LayerNorm_1": "norm_mlp_pre",
    "MlpBlock_0/Dense_0": "mlp/wi",
    "MlpBlock_0/Dense_1": "mlp/wo",
}
_BLOCK_RE = re.compile(r"Transformer/encoderblock(?:_(\d+))?/(.+)")  # no index: scanned layout
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip


# ------------------------------------------------------------------------------------------------ reading
def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file by key; never unpickles (object arrays are refused)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in _ZIP_MAGIC:
        raise InputError(
            f"{path} is not an .npz file (a zip archive of .npy arrays, as np.savez writes)."
        )
    out = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                out[key] = _read_member(npz, key, path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npz file: {e}") from None
    return out


def _read_member(npz: Any, key: str, path: str) -> np.ndarray:
    try:
        arr = npz[key]
    except ValueError as e:
        raise InputError(
            f"{path}: array {key!r} cannot be read with allow_pickle=False ({e}). Object arrays need "
            "unpickling, which can run arbitrary code, so they are refused; parameters are plain arrays."
        ) from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: member {key!r} is not a .npy array.")
    return arr


# ------------------------------------------------------------------------------------------------ renaming
def _rename(name: str, table: Mapping[str, str]) -> str | None:
    for bv, ours in table.items():
        if name == bv or name.startswith(bv + "/"):
            return ours + name[len(bv) :]
    return None


def _convert(name: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """One big_vision entry -> our (path, array) pairs; a scanned entry gives one pair per layer."""
    m = _BLOCK_RE.fullmatch(name)
    if m is None:
        ours = _rename(name, _TOP)
        return [(ours, arr)] if ours else []
    rest = _rename(m.group(2), _BLOCK)
    if rest is None:
        return []
    if m.group(1) is not None:
        return [(f"encoder/block_{int(m.group(1))}/{rest}", arr)]
    return [(f"encoder/block_{i}/{rest}", arr[i]) for i in range(arr.shape[0])]


def vit_from_big_vision(flat: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """big_vision names (under ``prefix``, e.g. "img") -> our unscanned ViT paths; unknown names are dropped."""
    pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
    return dict(
        pair
        for n, a in sorted(flat.items())
        if n.startswith(pre)
        for pair in _convert(n[len(pre) :], a)
    )


# ------------------------------------------------------------------------------------------------ posemb
def _isqrt(n: int) -> int | None:
    r = int(np.sqrt(n)) if n > 0 else 0
    return next((s for s in (r - 1, r, r + 1) if s > 0 and s * s == n), None)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights, end points aligned (scipy.ndimage.zoom order=1 semantics)."""
    w = np.zeros((n_out, n_in))
    if n_in == 1:
        w[:, 0] = 1.0
        return w
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    rows = np.arange(n_out)
    w[rows, lo] = 1.0 - (pos - lo)
    w[rows, lo + 1] += pos - lo
    return w


def resample_posemb(
    posemb: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> np.ndarray:
    """[1, h*w, width] -> [1, H*W, width] by bilinear interpolation over the (row-major) patch grid.

    ``old_grid`` defaults to the square grid of ``h*w`` tokens (big_vision models are square).
    """
    _, n, width = posemb.shape
    if old_grid is None:
        side = _isqrt(n)
        if side is None:
            raise ValueError(f"{n} position embeddings are not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} does not hold {n} position embeddings")
    grid = np.asarray(posemb, np.float64).reshape(*old_grid, width)
    wy, wx = _interp_matrix(old_grid[0], new_grid[0]), _interp_matrix(old_grid[1], new_grid[1])
    out = np.einsum("Yy,Xx,yxc->YXc", wy, wx, grid)
    return out.reshape(1, -1, width).astype(posemb.dtype)


def _cls_posemb_error(n: int) -> ValueError:
    return ValueError(
        f"the model's pos_embedding has {n} = 1 + {n - 1} tokens: it gives the class token a position "
        "embedding (ViT cls_posemb=True, the default). big_vision adds position embeddings to the patches "
        "only and gives the class token none; set model.cls_posemb=False to load this checkpoint."
    )


def _fit_posemb(
    src: np.ndarray, shape: tuple, has_cls: bool, grid: tuple[int, int] | None
) -> np.ndarray:
    """The checkpoint's posemb resampled to the model's grid, or a ValueError saying why not."""
    if src.ndim != 3 or len(shape) != 3 or src.shape[2] != shape[2]:
        raise ValueError("not a [1, tokens, width] array of the model's width")
    n = shape[1]
    if grid is None:
        side = _isqrt(n)
        if side is None and has_cls and _isqrt(n - 1):
            raise _cls_posemb_error(n)
        if side is None:
            raise ValueError(f"{n} tokens are not a square grid; pass grid=(h, w) to load_into")
        grid = (side, side)
    elif grid[0] * grid[1] != n:
        if has_cls and grid[0] * grid[1] + 1 == n:
            raise _cls_posemb_error(n)
        raise ValueError(f"grid {grid} does not hold the model's {n} tokens")
    return resample_posemb(src, grid)


# ------------------------------------------------------------------------------------------------ reports
def mismatch_message(header: str, wrong: list[str], missing: list[str], hints: list[str]) -> str:
    """One report for a checkpoint that does not fit: wrong shapes, missing names, how to fix it."""
    lines = [header] + [f"  {w}" for w in wrong]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        lines.append(f"  not found in checkpoint ({len(missing)}): {missing[:8]}{more}")
    return "\n".join(lines + [f"  {h}" for h in hints])


# ------------------------------------------------------------------------------------------------ export
def _split_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for p, v in flat.items():
        m = re.fullmatch(r"encoder/blocks/(.+)", p)
        if m is None:
            out[p] = v
        else:
            out.update({f"encoder/block_{i}/{m.group(1)}": v[i] for i in range(v.shape[0])})
    return out


def to_big_vision(vit_params: Mapping, scanned: bool | None = None) -> dict[str, np.ndarray]:
    """Our ViT params -> big_vision's flat names (the inverse of ``vit_from_big_vision``).

    ``scanned``: write big_vision's ``Transformer/encoderblock/...`` stack (depth on axis 0) instead of
    ``encoderblock_{i}``; None = as ``vit_params`` is. Parameters big_vision's ViT has no name for (registers,
    Normformer norms, GeGLU, norms without bias i.e. RMSNorm or use_bias=False, a class-token position embedding)
    raise a ValueError listing them, since the file would not compute our function there.
    """
    flat = {p: np.asarray(v) for p, v in tree.flatten(vit_params).items()}
    was_scanned = any(p.startswith("encoder/blocks/") for p in flat)
    flat = _split_blocks(flat)
    top, block = {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()}
    out, bad = {}, []
    for p, v in flat.items():
        m = re.fullmatch(r"encoder/block_(\d+)/(.+)", p)
        rest = _rename(m.group(2), block) if m else None
        name = (
            (f"Transformer/encoderblock_{m.group(1)}/{rest}" if rest else None)
            if m
            else _rename(p, top)
        )
        if p.endswith("/scale") and p[: -len("scale")] + "bias" not in flat:
            name = None
        if p == "pos_embedding" and "cls" in flat and _isqrt(v.shape[1]) is None:
            name = None  # cls_posemb=True: big_vision gives the class token no position embedding
        if name is None:
            bad.append(p)
        else:
            out[name] = v
    if bad:
        raise ValueError(
            f"big_vision's ViT has no parameter for {bad}: only LayerNorm-with-bias, GELU-MLP towers without "
            "registers, Normformer norms or a class-token position embedding can be exported."
        )
    if scanned if scanned is not None else was_scanned:
        stacks: dict[str, dict[int, np.ndarray]] = {}
        for name in [n for n in out if _BLOCK_RE.fullmatch(n)]:
            m = _BLOCK_RE.fullmatch(name)
            stacks.setdefault(m.group(2), {})[int(m.group(1))] = out.pop(name)
        for rest, layers in stacks.items():
            out[f"Transformer/encoderblock/{rest}"] = np.stack(
                [layers[i] for i in range(len(layers))]
            )
    return out
