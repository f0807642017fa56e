"""Load big_vision ViT parameters (its ``.npz`` checkpoints) into pretrain/vit.py's ViT.

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
Towers nested in a bigger model (CapPa/SigLIP ``img/...``, or ``params/img/...`` in training checkpoints) are
selected with ``prefix``.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from pretrain.vit import unscanned_to_scan
from transfer import tree
from transfer.checkpoint import CheckpointMismatchError

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
        raise ValueError(
            f"{path} is not an .npz file (a zip archive of .npy arrays, as np.savez writes)."
        )
    out = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                out[key] = _read_member(npz, key, path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from None
    return out


def _read_member(npz: Any, key: str, path: str) -> np.ndarray:
    try:
        arr = npz[key]
    except ValueError as e:
        raise ValueError(
            f"{path}: array {key!r} cannot be read with allow_pickle=False ({e}). Object arrays need "
            "unpickling, which can run arbitrary code, so they are refused; parameters are plain arrays."
        ) from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: member {key!r} is not a .npy array.")
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


def _map_names(
    flat: Mapping[str, np.ndarray], prefix: str
) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(our path -> array, our path -> big_vision name, big_vision names that map to nothing)."""
    pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
    mapped, origin, unknown = {}, {}, []
    for name in sorted(flat):
        pairs = _convert(name[len(pre) :], flat[name]) if name.startswith(pre) else []
        if not pairs:
            unknown.append(name)
        for ours, arr in pairs:
            if ours in mapped:
                raise ValueError(f"{name} and {origin[ours]} both map to {ours}")
            mapped[ours], origin[ours] = arr, name
    return mapped, origin, unknown


def vit_from_big_vision(flat: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """big_vision names (under ``prefix``, e.g. "img") -> our unscanned ViT paths; unknown names are dropped.

    Both of big_vision's layouts are accepted: ``encoderblock_{i}`` and the scanned ``encoderblock`` stack.
    """
    return _map_names(flat, prefix)[0]


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


# ------------------------------------------------------------------------------------------------ loading
def _stack_blocks(mapped: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-layer paths -> the scanned ``encoder/blocks`` layout; stacked on the host, not on an accelerator."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        stacked = unscanned_to_scan(tree.unflatten(mapped))
    return {p: np.asarray(v) for p, v in tree.flatten(stacked).items()}


def _tower_prefixes(names: Sequence[str]) -> list[str]:
    """Where a file holds ViT towers (the prefixes of its ``embedding/kernel`` entries), for error hints."""
    return sorted(
        n[: -len("embedding/kernel")].rstrip("/")
        for n in names
        if re.fullmatch(r"(.*/)?embedding/kernel", n)
    )


def mismatch_message(header: str, wrong: list[str], missing: list[str], hints: list[str]) -> str:
    """One report for a checkpoint that does not fit: wrong shapes, missing names, how to fix it."""
    lines = [header] + [f"  {w}" for w in wrong]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        lines.append(f"  not found in checkpoint ({len(missing)}): {missing[:8]}{more}")
    return "\n".join(lines + [f"  {h}" for h in hints])


def _mismatch_message(
    npz_path: str, prefix: str, wrong: list[str], missing: list[str], towers: list[str] | None
) -> str:
    hints = [
        "To keep the initialisation of such parameters (e.g. a new head), add regexes for their paths to "
        "dont_load (re.fullmatch), e.g. dont_load=['head/.*']."
    ]
    if towers is not None:
        hints.append(
            f"No checkpoint name maps under prefix {prefix!r}; ViT towers in the file: {towers}"
        )
    header = f"big_vision checkpoint {npz_path} (prefix {prefix!r}) does not fit this model:"
    return mismatch_message(header, wrong, missing, hints)


def _match(target: dict, mapped: dict, dont_load: Sequence[str], full: Any, grid: Any) -> tuple:
    """Decides every target leaf: loaded, resampled, kept (dont_load), missing or of the wrong shape."""
    new, report = {}, {k: [] for k in ("loaded", "resampled", "kept_init")}
    wrong, missing = [], []
    for p, leaf in target.items():
        if any(re.fullmatch(r, full(p)) for r in dont_load):
            report["kept_init"].append(full(p))
            continue
        if p not in mapped:
            missing.append(full(p))
            continue
        src, shape, why = mapped[p], tuple(leaf.shape), ""
        if tuple(src.shape) == shape:
            new[p] = np.asarray(src, leaf.dtype)
            report["loaded"].append(full(p))
            continue
        if p == "pos_embedding":
            try:
                new[p] = np.asarray(_fit_posemb(src, shape, "cls" in target, grid), leaf.dtype)
                report["resampled"].append(full(p))
                continue
            except ValueError as e:
                why = f": {e}"
        wrong.append(
            f"{full(p)}: checkpoint has shape {tuple(src.shape)}, model expects {shape}{why}"
        )
    return new, report, wrong, missing


def load_into(
    params: Mapping,
    npz_path: str,
    *,
    prefix: str = "",
    dst_prefix: str = "",
    dont_load: Sequence[str] = (),
    grid: tuple[int, int] | None = None,
) -> tuple[dict, dict]:
    """Replaces the ViT leaves of ``params`` (under ``dst_prefix``) with a big_vision checkpoint's.

    Returns (new params, report). The report lists full target paths ``loaded`` as they are, ``resampled``
    (position embeddings of another grid; ``grid`` = the model's (h, w) patch grid if not square) and ``kept_init``
    (matched by a ``dont_load`` regex), and the checkpoint names ``unmatched_in_checkpoint`` (used by nothing), with
    ``num_*`` counts. Other shape mismatches and target parameters missing from the checkpoint raise, listing the
    paths: silently keeping a random init would only show up as a worse fine-tune. Loaded leaves are numpy arrays in
    the target leaf's dtype; the caller places them (e.g. jax.device_put with the param shardings).
    """
    flat_ckpt = read_npz(npz_path)
    mapped, origin, unknown = _map_names(flat_ckpt, prefix)
    flat_params = tree.flatten(params)
    dst = dst_prefix.strip("/")
    pre = f"{dst}/" if dst else ""
    full = lambda p: pre + p
    target = {p[len(pre) :]: v for p, v in flat_params.items() if p.startswith(pre)}
    if not target:
        raise ValueError(f"params holds nothing under dst_prefix {dst_prefix!r}")
    scanned = any(p.startswith("encoder/blocks/") for p in target)
    if scanned:
        mapped = _stack_blocks(mapped)

    new, report, wrong, missing = _match(target, mapped, dont_load, full, grid)
    if wrong or missing:
        towers = None if origin else _tower_prefixes(list(flat_ckpt))
        raise CheckpointMismatchError(_mismatch_message(npz_path, prefix, wrong, missing, towers))
    as_target = lambda p: re.sub(r"^encoder/block_\d+/", "encoder/blocks/", p) if scanned else p
    unused = {name for ours, name in origin.items() if as_target(ours) not in new}
    report["unmatched_in_checkpoint"] = sorted(set(unknown) | unused)
    report.update({f"num_{k}": len(v) for k, v in list(report.items())})
    out = dict(flat_params)
    out.update({full(p): v for p, v in new.items()})
    return tree.unflatten(out), report


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
