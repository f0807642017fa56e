"""Checkpoints with orbax: asynchronous, atomic, keep the last N; and `model_init` loading.

A checkpoint step directory holds three items:
  params: the full parameter tree (trainable and frozen), so other runs can load it with `model_init`;
  train:  optimizer state, step, RNG key data and the first non-finite step (if any);
  input:  JSON with each host's position in its input stream, so a resumed run reads exactly the next batches.
Orbax writes into a temporary directory and renames it when complete, so a half-written checkpoint is never listed
(and so never loaded).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from transfer import tree
from transfer.config import MissingFileError, UserError


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint whose tree does not fit the model: the message lists the paths."""


def manager(
    directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    registry = _type_handlers()
    handlers = {
        "params": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "train": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "input": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


def _type_handlers() -> Any:
    """Orbax's standard handlers, with replica-parallel saving only across processes.

    Replica-parallel saving splits a replicated array among its replicas so that several hosts write it
    together. Within one process one host writes every slice anyway, and the split costs one eager slice op
    per replica and array (8 per array on an 8-device host: most of a small model's save time).
    """
    # The same ArrayMetadata store as orbax's default handler (no public path to it; orbax is pinned).
    from orbax.checkpoint._src.metadata import array_metadata_store

    array_handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=array_metadata_store.Store(),
    )
    return ocp.type_handlers.create_type_handler_registry(
        *(
            (ty, array_handler if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
            for ty in ocp.type_handlers.supported_types()
        )
    )


def save(
    mngr: ocp.CheckpointManager, step: int, params: Any, train: Any, input_state: Mapping
) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(params),
            train=ocp.args.PyTreeSave(train),
            input=ocp.args.JsonSave(dict(input_state)),
        ),
        force=True,
    )


def _shapes(metadata_tree: Any) -> dict[str, tuple]:
    return {p: tuple(getattr(m, "shape", ())) for p, m in tree.flatten(metadata_tree).items()}


def _mismatch_report(expected: dict[str, tuple], found: dict[str, tuple], what: str) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(p for p in set(expected) & set(found) if expected[p] != found[p])
    lines = [f"{what} does not match this model:"]
    for p in wrong[:10]:
        lines.append(f"  {p}: checkpoint has shape {found[p]}, model expects {expected[p]}")
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): {missing[:5]}")
    if extra:
        lines.append(f"  not in model ({len(extra)}): {extra[:5]}")
    return "\n".join(lines)


def check_compatible(
    mngr: ocp.CheckpointManager, step: int, abstract_params: Any, workdir: str
) -> None:
    """Fails with the differing parameter paths instead of an opaque orbax error."""
    meta = mngr.item_metadata(step)["params"]
    found = _shapes(meta.tree if hasattr(meta, "tree") else meta)
    expected = _shapes(abstract_params)
    if found != expected:
        raise CheckpointMismatchError(
            _mismatch_report(expected, found, f"The checkpoint at step {step} in {workdir}")
            + "\nThe workdir belongs to another model: use a new --workdir, or delete its checkpoints "
            "to start over."
        )


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restores into the dtypes and shardings of `abstract` (ShapeDtypeStructs with .sharding)."""
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )


def restore(
    mngr: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_train: Any
) -> tuple[Any, Any, dict]:
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=_pytree_restore(abstract_params),
            train=_pytree_restore(abstract_train),
            input=ocp.args.JsonRestore(),
        ),
    )
    return out["params"], out["train"], dict(out["input"] or {})


# ---------------------------------------------------------------------------------------------- model_init
def _is_step_dir(path: str) -> bool:
    return re.fullmatch(r"\d+", os.path.basename(path)) is not None and os.path.isdir(
        os.path.join(path, "params")
    )


def is_run(path: str) -> bool:
    """A run of ours: a workdir (``checkpoints/`` inside), a checkpoints dir (``<step>/params`` inside) or a step
    dir (``params`` inside). Another tool's directory is not, and is never handed to orbax blind."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "checkpoints")) or _is_step_dir(path):
        return True
    return any(_is_step_dir(os.path.join(path, d)) for d in os.listdir(path))


def _checkpoint_dir(path: str) -> tuple[str, int]:
    """Accepts a workdir (uses its checkpoints/ latest step), a checkpoints dir or a step dir."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if _is_step_dir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    if not os.path.isdir(path):
        raise MissingFileError(f"config.model_init = '{path}' does not exist.")
    mngr = manager(path, read_only=True)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise MissingFileError(f"config.model_init = '{path}' holds no complete checkpoint.")
    return path, step


def _map_path(src: str, src_subtree: str, dst_subtree: str) -> str | None:
    src_subtree, dst_subtree = src_subtree.strip("/"), dst_subtree.strip("/")
    if src_subtree:
        if not src.startswith(src_subtree + "/"):
            return None
        src = src[len(src_subtree) + 1 :]
    return f"{dst_subtree}/{src}" if dst_subtree else src


def load_params(path: str, params: Any, shardings: Any, load_cfg: Mapping) -> tuple[Any, dict]:
    """Loads `params` leaves from another run's checkpoint; returns (new params, report).

    Every target parameter must be loaded unless a `dont_load` regex matches it; shapes must agree. Every source
    parameter under `src_subtree` must be used, unless its target is `dont_load` or a `skip` regex matches its
    name: an unused one means the checkpoint's model differs from this one. Names outside `src_subtree` are not
    loaded on purpose (an image tower out of a full CapPa run).
    """
    ckpt_dir, step = _checkpoint_dir(path)
    dont_load = [r for r in (load_cfg.get("dont_load") or [])]
    skip = [r for r in (load_cfg.get("skip") or [])]
    src_sub, dst_sub = load_cfg.get("src_subtree") or "", load_cfg.get("dst_subtree") or ""
    mngr = manager(ckpt_dir, read_only=True)
    meta = mngr.item_metadata(step)["params"]
    src_shapes = _shapes(meta.tree if hasattr(meta, "tree") else meta)
    flat_params, flat_shard = tree.flatten(params), tree.flatten(shardings)
    mapping, unused = {}, []
    for src in src_shapes:
        dst = _map_path(src, src_sub, dst_sub)
        if dst is None or any(re.fullmatch(r, dst) for r in dont_load):
            continue
        if dst in flat_params:
            mapping[src] = dst
        elif not any(re.fullmatch(r, src) for r in skip):
            unused.append(src)
    wrong = [
        f"{dst}: checkpoint {src_shapes[src]} vs model {tuple(flat_params[dst].shape)}"
        for src, dst in mapping.items()
        if src_shapes[src] != tuple(flat_params[dst].shape)
    ]
    loaded = set(mapping.values())
    missing = [
        p for p in flat_params if p not in loaded and not any(re.fullmatch(r, p) for r in dont_load)
    ]
    if wrong or missing or unused:
        mngr.close()
        msg = [f"config.model_init = '{path}' (step {step}) does not fit this model:"]
        msg += [f"  shape mismatch {w}" for w in wrong[:10]]
        if missing:
            msg.append(
                f"  not found in checkpoint ({len(missing)}): {missing[:5]}; add them to "
                "config.model_load.dont_load to keep their initialisation"
            )
        if unused:
            msg.append(
                f"  in the checkpoint but not in this model ({len(unused)}): {unused[:5]}; configure the "
                "model like the checkpoint's, or list them in config.model_load.skip (regexes) to leave "
                "them out on purpose"
            )
        raise CheckpointMismatchError("\n".join(msg))
    item = tree.unflatten(
        {
            s: jax.ShapeDtypeStruct(
                flat_params[d].shape, flat_params[d].dtype, sharding=flat_shard[d]
            )
            for s, d in mapping.items()
        }
    )
    restored = mngr.restore(
        step, args=ocp.args.Composite(params=_pytree_restore(item, partial=True))
    )["params"]
    mngr.close()
    out = dict(flat_params)
    flat_restored = tree.flatten(restored)
    for src, dst in mapping.items():
        out[dst] = flat_restored[src]
    report = {
        "model_init/loaded": len(mapping),
        "model_init/kept_init": len(flat_params) - len(mapping),
        "model_init/not_loaded": len(src_shapes) - len(mapping),
    }
    return tree.unflatten(out), report


def gather_ints(value: int) -> list[int]:
    """Every host's value (e.g. its input position), in process order, on each host."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(p) for p in np.asarray(multihost_utils.process_allgather(np.int64(value)))]
