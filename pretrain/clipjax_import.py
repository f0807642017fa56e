"""clip-jax's checkpoint format: its run directories, boxed names, naming tables and model config.

clip-jax (the CapPa reproduction) saves a training ``output_dir`` holding ``config.json`` (its ``CLIPModel``
config: ``vision_config``, ``text_config``) and an orbax CheckpointManager step ``<step>/default`` with
``{"params": ..., "opt_state": ...}``; users also keep ``flax.serialization.to_bytes(params)`` msgpack files.
Its parameters are boxed by flax (``nn.LogicallyPartitioned``), so every saved name ends in ``/value``.
tests/fixtures/clip_jax/ holds files written by clip-jax 0.0.6 itself (its README says how).

The config decides computations that the parameters alone do not show (whether the decoder sees the registers,
rotary or learnt positions, the norm, the MLP); ``config_problems`` maps each onto our model config and names
every difference with the key that fixes it, so a checkpoint never loads into a model computing something else.
The naming tables read "theirs -> ours" (clip_jax/modeling.py: ``CLIPModel`` with ``vision`` and ``text``; the
MLP's pre-norm lives inside ``mlp``; layers always scanned on axis 0).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from transfer import tree
from transfer.checkpoint import CheckpointMismatchError
from transfer.config import InputError

_NORMS = {"mlp/pre_mlp_norm": "norm_mlp_pre", "mlp/mid_mlp_norm": "mlp/norm_mid", "mlp": "mlp"}
VIT_BLOCK = {
    "pre_attention_norm": "norm_attn_pre",
    "attention": "attn",
    "post_attention_norm": "norm_attn_post",
    **_NORMS,
}
DEC_BLOCK = {
    "pre_attention_norm": "norm_self_pre",
    "attention": "self_attn",
    "post_attention_norm": "norm_self_post",
    "pre_cross_attention_norm": "norm_cross_pre",
    "cross_attention": "cross_attn",
    "post_cross_attention_norm": "norm_cross_post",
    **_NORMS,
}
VIT_TOP = {
    "embeddings/patch_embeds": "embedding",
    "embeddings/position_embeds": "pos_embedding",
    "embeddings/cls_token": "cls",
    "embeddings/registers": "registers",
    "final_norm": "encoder/norm_final",
}
TXT_TOP = {
    "embeddings/embeddings": "embedding",
    "embeddings/position_embeds": "pos_embedding",
    "final_norm": "norm_final",
    "logits": "head",
}
ONES = "(absent in clip-jax: a norm without scale = scale 1)"
_VIT_PRE = ("norm_attn_pre", "norm_mlp_pre")
_DEC_PRE = ("norm_self_pre", "norm_cross_pre", "norm_mlp_pre")


# ------------------------------------------------------------------------------------------------ reading
def unbox(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops flax's ``/value`` box suffix when every name carries it (LogicallyPartitioned parameters)."""
    if flat and all(n.endswith("/value") for n in flat):
        return {n[: -len("/value")]: v for n, v in flat.items()}
    return flat


def is_run_dir(path: str) -> bool:
    """A clip-jax output_dir: config.json with its model config, and orbax step directories."""
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and bool(_steps(path)) and "vision_config" in _read_json(cfg)


def _steps(path: str) -> list[int]:
    return sorted(
        int(d)
        for d in os.listdir(path)
        if d.isdigit() and os.path.isdir(os.path.join(path, d, "default"))
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def read_run(path: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(params as ``{"params/a/b": array}``, model config) of a clip-jax run directory; only the params item
    is read (the optimizer state stays on disk), as numpy arrays whatever devices wrote it."""
    import orbax.checkpoint as ocp

    steps = _steps(path)
    step = steps[-1] if step is None else step
    item_dir = os.path.abspath(os.path.join(path, str(step), "default"))
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(item_dir)
    meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    if not isinstance(meta, Mapping) or "params" not in meta:
        raise InputError(f"{item_dir} holds no 'params' item (top level: {sorted(meta or [])})")
    item = {"params": meta["params"]}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=tree.unflatten(
            {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in tree.flatten(item)}
        ),
        partial_restore=True,
    )
    restored = ckptr.restore(item_dir, args=args)
    flat = {k: np.asarray(v) for k, v in tree.flatten(restored).items()}
    return unbox(flat), _read_json(os.path.join(path, "config.json"))


def config_next_to(path: str) -> dict:
    """The clip-jax model config saved beside a parameter file (``config.json``), or {}."""
    cfg = _read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    return cfg if "vision_config" in cfg or "text_config" in cfg else {}


# ------------------------------------------------------------------------------------------------ config
def _mlp_type(acts: Any) -> str | None:
    return {("gelu",): "gelu", ("gelu", "linear"): "geglu"}.get(tuple(acts or ()))


def _tower_expect(cj: Mapping, text: bool) -> dict[str, Any]:
    """Our tower config values that compute what clip-jax's tower config computes (None = unsupported)."""
    norm = "rmsnorm" if cj.get("use_rmsnorm") else "layernorm"
    ln = cj.get("ln_type", "preln")
    pos = cj.get("position_embedding_type", "learnt")
    out = dict(
        width=cj.get("hidden_size"),
        depth=cj.get("num_layers"),
        mlp_dim=cj.get("mlp_dim"),
        num_heads=cj.get("num_heads"),
        norm=norm,
        use_bias=bool(cj.get("use_bias")),
        normformer={"normformer": True, "preln": False}.get(ln),
        mlp_type=_mlp_type(cj.get("activations")),
    )
    if text:
        out.update(
            vocab_size=cj.get("vocab_size"),
            max_len=cj.get("max_length"),
            posemb={"rotary": "rope", "learnt": "learn"}.get(pos),
        )
    else:
        out.update(
            patch_size=cj.get("patch_size"),
            num_registers=int(cj.get("registers") or 0),
            posemb={"learnt": "learn", "sincos2d": "sincos2d"}.get(pos),
        )
    return out


def _unsupported(cj: Mapping, where: str) -> list[str]:
    bad = [f"{where}.normalize_qk=True (our attention has no q/k norms)"] * bool(
        cj.get("normalize_qk")
    )
    if cj.get("position_embedding_factorized"):
        bad.append(f"{where}.position_embedding_factorized=True (ours are one table)")
    if where == "vision_config" and cj.get("use_causal_mask"):
        bad.append("vision_config.use_causal_mask=True (our ViT attends both ways)")
    if where == "text_config" and not cj.get("is_decoder", True):
        bad.append(
            "text_config.is_decoder=False (a contrastive text encoder, not a captioning decoder)"
        )
    return bad


def config_problems(cj: Mapping, model: Mapping | None, key: str = "model") -> list[str]:
    """Every way ``model`` (our CapPa config with img/txt, or a ViT config) would compute something other than
    the clip-jax model of config ``cj``; each item names clip-jax's value and our key to set."""
    if model is None:
        return []
    towers = [("vision_config", "img", False), ("text_config", "txt", True)]
    if "img" not in model:  # a single ViT (a probe's or classifier's tower)
        towers = [("vision_config", "", False)]
    problems = []
    for cj_key, ours, text in towers:
        sub = cj.get(cj_key)
        have = model.get(ours) if ours else model
        if not isinstance(sub, Mapping) or not isinstance(have, Mapping):
            continue
        problems += _unsupported(sub, cj_key)
        for name, want in _tower_expect(sub, text).items():
            got = have.get(name)
            if name == "width" and got is None and text:
                got = (model.get("img") or {}).get("width")
            if name == "num_heads" and got is None and text:
                got = (model.get("img") or {}).get("num_heads")
            if name == "patch_size" and isinstance(got, (tuple, list)):
                got = got[0] if len(set(got)) == 1 else got
            if want is None:
                problems.append(f"{cj_key}: a setting of {name} our model does not have")
            elif got is not None and got != want:
                path = ".".join(p for p in (key, ours, name) if p)
                problems.append(
                    f"{cj_key} gives {name}={want!r}, but {path}={got!r}: set {path}={want!r}"
                )
    keep = cj.get("vision_config", {}).get("keep_registers", True)
    if "img" in model and bool(model.get("keep_registers", True)) != bool(keep):
        problems.append(
            f"vision_config.keep_registers={keep}: the decoder {'sees' if keep else 'does not see'} the "
            f"registers; set {key}.keep_registers={bool(keep)}"
        )
    return problems


def mask_token_id(cj: Mapping) -> int | None:
    """clip-jax's [MASK] is an ordinary vocabulary id; ours is an extra row that takes that row's values."""
    tid = (cj.get("text_config") or {}).get("mask_token_id")
    return None if tid is None else int(tid)


# ------------------------------------------------------------------------------------------------ scales
def fill_scales(fmt: str, mapped: dict, origin: dict, unknown: list) -> None:
    """clip-jax builds most norms with ``use_scale=force_scale`` (False by default): no parameter, i.e. scale 1.

    Ours always have a scale, so the missing ones become ones: the pre-norms of every block, the final norm, and
    the mid-MLP norm of Normformer blocks (recognised by their post-attention norm, which clip-jax always scales).
    """
    odd = [
        n
        for n in unknown
        if re.search(r"/(norm_query|norm_key|position_embeds_(height|width))\b", n)
    ]
    if odd:
        raise CheckpointMismatchError(
            f"clip-jax parameters without an equivalent in our model: {odd[:6]}"
        )
    if fmt == "clip_jax":
        _fill(mapped, origin, "img/", "encoder", "img/embedding/kernel", _VIT_PRE)
        _fill(mapped, origin, "txt/", "decoder", "txt/embedding/embedding", _DEC_PRE)
    else:
        _fill(mapped, origin, "", "encoder", "embedding/kernel", _VIT_PRE)


def _fill(mapped: dict, origin: dict, root: str, stack: str, width_key: str, pre: tuple) -> None:
    if width_key not in mapped:
        return
    width = mapped[width_key].shape[-1]
    final = f"{root}encoder/norm_final/scale" if stack == "encoder" else f"{root}norm_final/scale"
    want = {final: width}
    blocks = {
        m.group(0) for p in mapped if (m := re.match(rf"{re.escape(root)}{stack}/block_\d+/", p))
    }
    for blk in blocks:
        want.update({f"{blk}{n}/scale": width for n in pre})
        post = any(p.startswith(blk) and "_post/" in p for p in mapped)
        if post and f"{blk}mlp/wo/kernel" in mapped:
            want[f"{blk}mlp/norm_mid/scale"] = mapped[f"{blk}mlp/wo/kernel"].shape[0]
    for p, n in want.items():
        if p not in mapped:
            mapped[p], origin[p] = np.ones(n, np.float32), {ONES}
