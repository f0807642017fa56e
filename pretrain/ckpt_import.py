"""Load published CapPa / big_vision / clip-jax parameters into our models, and export our ViT to big_vision.

Why: the CapPa task (``model_load.loader = "pretrain.ckpt_import:load_into"``) starts from checkpoints trained
elsewhere. They compute what our ``pretrain.cappa.Model`` computes but name (and sometimes stack) parameters
differently, so loading is a renaming, plus the few real conversions listed below. The format is detected from the
names under ``prefix``:

=================  ===========================================  ===========================================
format             names (under ``prefix``)                     lands in
=================  ===========================================  ===========================================
big_vision ViT     ``embedding/kernel``, ``Transformer/...``     a ViT tower (pretrain/bv_import.py does it)
SigLIP (2 towers)  ``img/<big_vision ViT>``, ``txt/...``         ``img/...`` (``txt`` is not ours: unmatched)
big_vision CapPa   ``encoder/<big_vision ViT>``, ``decoder/...``  ``img/...`` and ``txt/...``
                   ``pos_embedding_decoder``
clip-jax           ``vision/...``, ``text/...`` (``params/``     ``img/...`` and ``txt/...``
                   in front is dropped)
clip-jax vision    ``embeddings/patch_embeds/kernel``, ...       a ViT tower
=================  ===========================================  ===========================================

So one tower of a two-tower file goes into a classifier's ``img`` with ``prefix`` = the file's tower name and
``dst_prefix="img"``: ``"img"`` (SigLIP), ``"encoder"`` (big_vision CapPa), ``"vision"`` (clip-jax).

Conversions beyond renaming:

* layer stacks: big_vision ViT scans on axis 0, big_vision's CapPa decoder on axis 1 (``EncDecBlock/...``),
  clip-jax always scans on axis 0 (``encoder/layers/...``); they are split into layers and stacked again on axis 0
  for a target built with ``scan=True`` (``.../blocks/...``);
* the image position embedding of another patch grid is resampled (``bv_import.resample_posemb``);
* clip-jax norms built with ``use_scale=False`` (its ``force_scale=False`` default: every norm except the
  Normformer post-attention ones) have no parameter; ours always have a scale, which is set to 1 (same function);
* the [MASK] row: our embedding has ``vocab_size + 1`` rows (row ``vocab_size`` = [MASK]). A table of
  ``vocab_size`` rows (big_vision without masked prediction, clip-jax whose mask token is an ordinary id) fills the
  first rows; the last keeps its init, or copies row ``mask_token_id`` of the checkpoint when given.

Files are read without unpickling: ``.npz`` with ``allow_pickle=False`` (bv_import.read_npz), flax msgpack with
``flax.serialization.msgpack_restore``. The naming tables below read "theirs -> ours": ``_BV_DEC_*`` from the flax
module names of big_vision's proj/cappa/cappa.py (``EncDecBlock{i}``, ``pos_embedding_decoder`` at the top level),
``_CJ_*`` from clip-jax's clip_jax/modeling.py (``CLIPModel`` with ``vision`` and ``text`` sub-modules; the MLP's
pre-norm lives inside ``mlp``). clip-jax features our model does not have (``normalize_qk``, factorized position
embeddings) raise; its MAP head and CLIP scalars are reported unmatched. Token conventions are not parameters: clip-jax
feeds its own BOS/mask ids, our decoder shifts right with id 0 and masks with id ``vocab_size``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import serialization

from pretrain import bv_import, clipjax_import
from transfer import tree
from transfer.checkpoint import CheckpointMismatchError
from transfer.config import ConfigError, InputError, MissingFileError

_BV_DEC_BLOCK = {
    "LayerNorm1": "norm_self_pre",
    "SelfAttn": "self_attn",
    "LayerNorm2": "norm_cross_pre",
    "CrossAttn": "cross_attn",
    "LayerNorm3": "norm_mlp_pre",
    "MLP/Dense_0": "mlp/wi",
    "MLP/Dense_1": "mlp/wo",
}
_BV_DEC_TOP = {
    "pos_embedding_decoder": "pos_embedding",
    "decoder/EmbedTargets": "embedding",
    "decoder/LayerNorm": "norm_final",
    "decoder/LogitsDense": "head",
}
_WHERE_IMG = {"siglip": "img", "big_vision_cappa": "encoder", "clip_jax": "vision"}
_ONES = clipjax_import.ONES
Pairs = list[tuple[str, np.ndarray]]


# ------------------------------------------------------------------------------------------------ reading
def read_flat(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpoint as (``{"a/b/c": array}``, clip-jax model config or {}): an ``.npz`` (flattened names), a flax
    msgpack file (a tree; flax's ``/value`` boxes dropped), or a clip-jax run directory (orbax, item ``default``)."""
    if os.path.isdir(path):
        if clipjax_import.is_run_dir(path):
            return clipjax_import.read_run(path)
        raise InputError(
            f"{path} is a directory but not a clip-jax run (config.json with vision_config, and "
            "<step>/default orbax items). A run of ours is loaded by the engine (config.model_init = its "
            "workdir, with checkpoints/<step>/params inside); files: big_vision .npz, flax msgpack."
        )
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head in bv_import._ZIP_MAGIC:
        return bv_import.read_npz(path), {}
    with open(path, "rb") as f:
        data = f.read()
    try:
        restored = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise InputError(
            f"{path} is neither an .npz file nor a flax msgpack file ({type(e).__name__}: {e}). Supported: "
            "np.savez of flattened 'a/b/c' names, flax.serialization.msgpack_serialize of a parameter tree."
        ) from None
    if not isinstance(restored, Mapping):
        raise InputError(
            f"{path}: the msgpack file holds a {type(restored).__name__}, not a parameter tree"
        )
    flat = clipjax_import.unbox({k: np.asarray(v) for k, v in tree.flatten(restored).items()})
    return flat, clipjax_import.config_next_to(path)


# ------------------------------------------------------------------------------------------------ renaming
def _tower(block_re: str, block: dict, axis: int, stack: str, top: dict) -> Callable:
    """A converter of one tower's names: blocks (``block_re`` groups: layer index, or "" when the layers are stacked
    on ``axis``; the rest) become ``<stack>/block_{i}/...``; other names are renamed by ``top``."""

    def convert(name: str, arr: np.ndarray) -> Pairs:
        m = re.fullmatch(block_re, name)
        if m is None:
            ours = bv_import._rename(name, top)
            return [(ours, arr)] if ours else []
        rest = bv_import._rename(m.group(2), block)
        if rest is None:
            return []
        if m.group(1):
            return [(f"{stack}/block_{int(m.group(1))}/{rest}", arr)]
        return [
            (f"{stack}/block_{i}/{rest}", np.take(arr, i, axis)) for i in range(arr.shape[axis])
        ]

    return convert


_bv_decoder = _tower(r"decoder/EncDecBlock(\d*)/(.+)", _BV_DEC_BLOCK, 1, "decoder", _BV_DEC_TOP)
_cj_vit = _tower(
    r"encoder/layers()/(.+)", clipjax_import.VIT_BLOCK, 0, "encoder", clipjax_import.VIT_TOP
)
_cj_txt = _tower(
    r"encoder/layers()/(.+)", clipjax_import.DEC_BLOCK, 0, "decoder", clipjax_import.TXT_TOP
)


def _towers(*routes: tuple[str, str, Callable[[str, np.ndarray], Pairs]]) -> Callable:
    """(source sub-tree, our tower, converter) routes; the first route whose source sub-tree holds a name wins."""

    def convert(name: str, arr: np.ndarray) -> Pairs:
        for src, dst, fn in routes:
            if src and not name.startswith(src + "/"):
                continue
            return [(f"{dst}/{p}", a) for p, a in fn(name[len(src) + 1 :] if src else name, arr)]
        return []

    return convert


_FORMATS = {  # name: (marker names, converter); the first format with a marker present wins
    "big_vision_cappa": (
        ("decoder/EmbedTargets/embedding", "encoder/embedding/kernel"),
        _towers(("encoder", "img", bv_import._convert), ("", "txt", _bv_decoder)),
    ),
    "clip_jax": (
        ("vision/embeddings/patch_embeds/kernel", "text/embeddings/embeddings/embedding"),
        _towers(("vision", "img", _cj_vit), ("text", "txt", _cj_txt)),
    ),
    "siglip": (("img/embedding/kernel",), _towers(("img", "img", bv_import._convert))),
    "clip_jax_vision": (("embeddings/patch_embeds/kernel",), _cj_vit),
    "big_vision_vit": (("embedding/kernel",), bv_import._convert),
}


def detect_format(names: Sequence[str]) -> str:
    """Which supported layout a set of (prefix-stripped) names is in; InputError naming what was seen if none."""
    have = set(names)
    for fmt, (markers, _) in _FORMATS.items():
        if any(m in have for m in markers):
            return fmt
    raise InputError(
        f"cannot tell the checkpoint format: no known marker name is present (top-level names: {_tops(names)}). "
        f"Known formats: {list(_FORMATS)}. Check prefix, the sub-tree of the file to load."
    )


def _subtree(flat: Mapping[str, np.ndarray], prefix: str) -> str:
    """The name prefix to load: ``prefix/``, or ``params/prefix/`` inside a training state's or a released SigLIP
    file's {"params": ...}; ``img`` also names the image tower of a CapPa (``encoder``) or clip-jax (``vision``) file.
    """
    pre = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if not pre:
        return "params/" if flat and all(n.startswith("params/") for n in flat) else ""
    aliases = [w + "/" for w in _WHERE_IMG.values()] if pre == "img/" else []
    for cand in [pre, "params/" + pre] + aliases + ["params/" + a for a in aliases]:
        if any(n.startswith(cand) for n in flat):
            return cand
    raise InputError(
        f"no checkpoint name starts with prefix {prefix!r}; top-level names: {_tops(flat)}"
    )


def _tops(names: Sequence[str]) -> list[str]:
    return sorted({n.split("/")[0] for n in names})[:20]


def _map_names(flat: Mapping[str, np.ndarray], prefix: str) -> tuple[str, dict, dict, list]:
    """(format, our path -> array, our path -> set of source names, source names that map to nothing)."""
    pre = _subtree(flat, prefix)
    fmt = detect_format([n[len(pre) :] for n in flat if n.startswith(pre)])
    convert = _FORMATS[fmt][1]
    mapped, origin, unknown = {}, {}, []
    for name in sorted(flat):
        pairs = convert(name[len(pre) :], flat[name]) if name.startswith(pre) else []
        if not pairs:
            unknown.append(name)
        for ours, arr in pairs:
            if ours in mapped:
                raise InputError(f"{name} and {sorted(origin[ours])} both map to {ours}")
            mapped[ours], origin[ours] = np.asarray(arr), {name}
    if fmt.startswith("clip_jax"):
        clipjax_import.fill_scales(fmt, mapped, origin, unknown)
    return fmt, mapped, origin, unknown


# ------------------------------------------------------------------------------------------------ stacking
def _stack(mapped: dict, origin: dict, target: Sequence[str]) -> tuple[dict, dict]:
    """Per-layer ``<stack>/block_{i}/...`` -> ``<stack>/blocks/...`` (axis 0) where the target is scanned."""
    layer_re = re.compile(r"(.*?(?:encoder|decoder))/block_(\d+)/(.+)")
    scanned = {
        m.group(1) for p in target if (m := re.match(r"(.*?(?:encoder|decoder))/blocks/", p))
    }
    out, out_origin, layers = {}, {}, {}
    for p, arr in mapped.items():
        m = layer_re.fullmatch(p)
        if m and m.group(1) in scanned:
            stacked = f"{m.group(1)}/blocks/{m.group(3)}"
            layers.setdefault(stacked, {})[int(m.group(2))] = (arr, origin[p])
        else:
            out[p], out_origin[p] = arr, origin[p]
    for p, by_layer in layers.items():
        if sorted(by_layer) != list(range(len(by_layer))):
            raise CheckpointMismatchError(
                f"{p}: the checkpoint has layers {sorted(by_layer)}, not 0..n-1"
            )
        out[p] = np.stack([by_layer[i][0] for i in range(len(by_layer))])
        out_origin[p] = set().union(*(o for _, o in by_layer.values()))
    return out, out_origin


# ------------------------------------------------------------------------------------------------ matching
def _fit(
    p: str, src: np.ndarray, leaf: Any, target: Mapping, grid: Any, mask_token_id: Any
) -> tuple:
    """(array, report key) for a leaf whose shape differs from the checkpoint's; ValueError saying why not."""
    shape = tuple(leaf.shape)
    if p in ("pos_embedding", "img/pos_embedding"):
        has_cls = p.replace("pos_embedding", "cls") in target
        return bv_import._fit_posemb(src, shape, has_cls, grid), "resampled"
    if (
        p.endswith("embedding/embedding")
        and src.ndim == 2
        and (src.shape[0] + 1, src.shape[1]) == shape
    ):
        out = np.array(leaf, dtype=leaf.dtype)  # the [MASK] row (the last) keeps its init ...
        out[: src.shape[0]] = src
        if mask_token_id is not None:  # ... or is the checkpoint's own mask token
            out[-1] = src[int(mask_token_id)]
        return out, "extended"
    if p.endswith("pos_embedding"):
        raise ValueError(f"set the decoder's max_len to {src.shape[1]} (the checkpoint's)")
    raise ValueError("")


def _match(
    target: dict, mapped: dict, dont_load: Sequence[str], full: Callable, **fit_kw: Any
) -> tuple:
    """Decides every target leaf: loaded, resampled, extended, kept (dont_load), missing or of the wrong shape."""
    new, wrong, missing = {}, [], []
    report = {k: [] for k in ("loaded", "resampled", "extended", "kept_init")}
    for p, leaf in target.items():
        if any(re.fullmatch(r, full(p)) for r in dont_load):
            report["kept_init"].append(full(p))
        elif p not in mapped:
            missing.append(full(p))
        elif tuple(mapped[p].shape) == tuple(leaf.shape):
            new[p] = np.asarray(mapped[p], leaf.dtype)
            report["loaded"].append(full(p))
        else:
            try:
                arr, key = _fit(p, mapped[p], leaf, target, **fit_kw)
                new[p] = np.asarray(arr, leaf.dtype)
                report[key].append(full(p))
            except ValueError as e:
                why = f": {e}" if str(e) else ""
                shapes = f"checkpoint has shape {tuple(mapped[p].shape)}, model expects {tuple(leaf.shape)}"
                wrong.append(f"{full(p)}: {shapes}{why}")
    return new, report, wrong, missing


def _mismatch_message(
    path: str, fmt: str, prefix: str, wrong: list, missing: list, towers: bool
) -> str:
    hints = [
        "Fix: configure the model like the checkpoint (width, mlp_dim, vocab_size, norm, use_bias, image "
        "resolution via grid=...), or keep the init of such parameters with dont_load regexes (re.fullmatch on "
        "the model's paths, e.g. dont_load=['img/head/.*'])."
    ]
    if towers and fmt in _WHERE_IMG:
        hints.append(
            f"This file holds two towers; its image tower alone goes into a ViT (e.g. a classifier's 'img') "
            f"with prefix={_WHERE_IMG[fmt]!r}, dst_prefix='img'."
        )
    header = f"checkpoint {path} ({fmt} format, prefix {prefix!r}) does not fit this model:"
    return bv_import.mismatch_message(header, wrong, missing, hints)


def _one_tower(
    fmt: str, sub: str, names: Sequence[str], mapped: dict, origin: dict, target: Mapping
):
    """A two-tower file loaded into one tower (a ViT, or a classifier's ``img``): its image tower.

    Returns (image-tower paths -> arrays, their origins, the file's names outside the image tower)."""
    if fmt not in _WHERE_IMG or any(p.startswith(("img/", "txt/")) for p in target):
        return mapped, origin, []
    tower = sub + _WHERE_IMG[fmt] + "/"
    keep = [p for p in mapped if p.startswith("img/")]
    other = sorted(n for n in names if n.startswith(sub) and not n.startswith(tower))
    return {p[4:]: mapped[p] for p in keep}, {p[4:]: origin[p] for p in keep}, other


def _unused_message(path: str, fmt: str, unused: list[str]) -> str:
    hints = []
    if any(n.endswith("decoder/LayerNorm/bias") for n in unused):
        hints.append(
            "decoder/LayerNorm/bias: big_vision's final decoder LayerNorm keeps its bias even with "
            "decoder_bias=False; set model.txt.norm_final_bias=True."
        )
    if any(re.search(r"(^|/)head/(kernel|bias)$", n) for n in unused):
        hints.append("head/...: the file's classifier head; this model has no head of that name.")
    hints.append(
        "Configure the model like the checkpoint, or skip these names on purpose with "
        "model_load.skip=[regex, ...] (re.fullmatch on the checkpoint's names), e.g. "
        f"skip={[_skip_regex(unused[0])]}."
    )
    more = " ..." if len(unused) > 10 else ""
    lines = [
        f"checkpoint {path} ({fmt} format) has {len(unused)} arrays this model does not use: "
        f"{unused[:10]}{more}"
    ]
    return "\n".join(lines + [f"  {h}" for h in hints])


def _skip_regex(name: str) -> str:
    return re.escape(name.rsplit("/", 1)[0]) + "/.*" if "/" in name else re.escape(name)


def load_into(
    params: Mapping,
    path: str,
    *,
    prefix: str = "",
    dst_prefix: str = "",
    dont_load: Sequence[str] = (),
    skip: Sequence[str] = (),
    grid: tuple[int, int] | None = None,
    mask_token_id: int | None = None,
    model: Mapping | None = None,
) -> tuple[dict, dict]:
    """Replaces the leaves of ``params`` under ``dst_prefix`` with the checkpoint's (sub-tree ``prefix``).

    Every target leaf is loaded unless a ``dont_load`` regex matches its path, and every checkpoint array under
    ``prefix`` is used unless a ``skip`` regex matches its name (or its target is ``dont_load``): anything else
    raises CheckpointMismatchError naming the paths, since a silently random parameter, or a checkpoint option
    our model ignores, only shows up as worse numbers. A two-tower file loaded into one tower gives its image
    tower; a classifier head (``head/...``) with no place under ``dst_prefix`` goes to a top-level ``head``.
    Returns (new params, report): full target paths ``loaded``, ``resampled`` (image position embeddings of
    another grid; ``grid`` = the model's (h, w) patch grid when not square), ``extended`` (an embedding that
    gained the [MASK] row), ``kept_init`` (dont_load), ``filled_ones`` (clip-jax norms without scale), the
    checkpoint's ``not_loaded`` (target dont_load), ``skipped``, ``other_tower`` and ``outside_prefix`` names,
    ``format`` and ``num_*`` counts. Loaded leaves are numpy arrays in the target leaf's dtype; the caller
    places them on devices. ``model`` (our model config) is checked against a clip-jax file's saved config,
    whose [MASK] id also fills our [MASK] row unless ``mask_token_id`` is given.
    """
    flat_ckpt, cj_config = read_flat(path)
    if cj_config:
        problems = clipjax_import.config_problems(cj_config, model)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {path}: its clip-jax config computes something this model does not:\n  "
                + "\n  ".join(problems)
            )
        if mask_token_id is None:
            mask_token_id = clipjax_import.mask_token_id(cj_config)
    fmt, mapped, origin, unknown = _map_names(flat_ckpt, prefix)
    if fmt.startswith("clip_jax") and not cj_config:
        print(
            f"note: {path} has no clip-jax config.json beside it: keep_registers, positions, norms and the "
            "[MASK] id are not checked against the model (the [MASK] row keeps its init)."
        )
    flat_params = tree.flatten(params)
    dst = dst_prefix.strip("/")
    pre = f"{dst}/" if dst else ""
    target = {p[len(pre) :]: v for p, v in flat_params.items() if p.startswith(pre)}
    if not target:
        raise ConfigError(f"params holds nothing under dst_prefix {dst_prefix!r}")
    sub = _subtree(flat_ckpt, prefix)
    mapped, origin, other_tower = _one_tower(fmt, sub, list(flat_ckpt), mapped, origin, target)
    mapped, origin = _stack(mapped, origin, list(target))
    heads = {p for p in mapped if p.startswith("head/") and p not in target and pre}
    full = lambda p: p if p in heads else pre + p
    target.update({p: flat_params[p] for p in heads if p in flat_params})
    new, report, wrong, missing = _match(
        target, mapped, dont_load, full, grid=grid, mask_token_id=mask_token_id
    )
    if wrong or missing:
        towers = any(p.startswith(("img/", "txt/")) for p in mapped) and not any(
            p.startswith(("img/", "txt/")) for p in target
        )
        raise CheckpointMismatchError(_mismatch_message(path, fmt, prefix, wrong, missing, towers))
    kept = {p for p in target if any(re.fullmatch(r, full(p)) for r in dont_load)}
    not_loaded = set().union(*(origin[p] for p in kept if p in origin))
    used = set().union(*(origin[p] for p in new)) | not_loaded
    sources = set().union(*origin.values()) if origin else set()
    unused = sorted(
        ({n for n in unknown if n.startswith(sub)} | (sources - used)) - {_ONES} - set(other_tower)
    )
    report["skipped"] = [n for n in unused if any(re.fullmatch(r, n) for r in skip)]
    unused = [n for n in unused if n not in report["skipped"]]
    if unused:
        raise CheckpointMismatchError(_unused_message(path, fmt, unused))
    report["filled_ones"] = sorted(full(p) for p in new if _ONES in origin[p])
    report["not_loaded"] = sorted(not_loaded - {_ONES})  # their targets are dont_load
    report["other_tower"] = other_tower
    report["outside_prefix"] = [n for n in unknown if not n.startswith(sub)]
    report.update({f"num_{k}": len(v) for k, v in list(report.items())})
    report["format"] = fmt
    report["config_checked"] = int(bool(cj_config) and model is not None)
    out = dict(flat_params)
    out.update({full(p): v for p, v in new.items()})
    return tree.unflatten(out), report


# ------------------------------------------------------------------------------------------------ export
def export_vision_tower(
    params: Mapping, out_path: str, fmt: str = "big_vision", *, scanned: bool | None = None
) -> list[str]:
    """Writes our image tower (``params["img"]`` when present, else ``params`` is the ViT) as a big_vision ViT npz.

    ``scanned`` picks big_vision's layout (``Transformer/encoderblock/...`` stacked on axis 0, or
    ``encoderblock_{i}``); None = the layout of ``params``. Only the big_vision family (LayerNorm with bias, GELU MLP,
    no registers, no Normformer norms) has big_vision names: anything else raises, naming the parameters.
    Returns the names written; ``load_into`` of the file gives back the same arrays.
    """
    if fmt != "big_vision":
        raise ValueError(f"unknown export format {fmt!r}; supported: 'big_vision'")
    img = params.get("img")
    tower = img if isinstance(img, Mapping) else params
    flat = bv_import.to_big_vision(tower, scanned=scanned)
    np.savez(out_path, **flat)
    return sorted(flat)
