"""Mesh, parameter sharding (FSDP by default, regex overrides) and batch sharding.

The same code runs on one CPU (a 1-device mesh), on 8 fake CPU devices and on a multi-host TPU pod: only the mesh
shape changes, never the code path.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transfer import tree
from transfer.config import ConfigError


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run: explicitly (`cappa train --coordinator_address ...`, e.g. several
    CPU or GPU hosts), or when the environment describes one (TPU pods, SLURM); no-op otherwise."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        # CPU processes need a collectives backend to talk to each other; accelerators ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError):
        pass  # Single process: nothing to join.


def make_mesh(mesh_cfg: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """`[("data", -1)]` or `[("data", 2), ("fsdp", -1)]`: -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names = [str(n) for n, _ in mesh_cfg]
    sizes = [int(s) for _, s in mesh_cfg]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.mesh has repeated axis names: {names}.")
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh = {list(mesh_cfg)}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(
                f"config.mesh = {list(mesh_cfg)}: {len(devices)} devices are not divisible "
                f"by the fixed axes' product {known}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"config.mesh = {list(mesh_cfg)} needs {math.prod(sizes)} devices, but "
            f"there are {len(devices)}. Use -1 for one axis to take the rest."
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, names)


def batch_axes(mesh: Mesh, config_axes: Sequence[str] | None = None) -> tuple[str, ...]:
    """`config.batch_axes` checked against the mesh; None = all its axes."""
    axes = tuple(config_axes) if config_axes else tuple(mesh.axis_names)
    for a in axes:
        if a not in mesh.axis_names:
            raise ConfigError(
                f"config.batch_axes names '{a}', not an axis of the mesh {mesh.axis_names}."
            )
    return axes


def batch_sharding(mesh: Mesh, axes: Sequence[str]) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(tuple(axes)))


def check_batch_size(global_batch: int, mesh: Mesh, axes: Sequence[str], what: str) -> None:
    shards = math.prod(mesh.shape[a] for a in axes)
    if global_batch % shards:
        raise ConfigError(
            f"{what} = {global_batch} is not divisible by the {shards} batch shards "
            f"(mesh axes {tuple(axes)} of {dict(mesh.shape)}); use a multiple of {shards}."
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"{what} = {global_batch} is not divisible by {jax.process_count()} hosts."
        )


def fsdp_spec(
    shape: Sequence[int], mesh: Mesh, fsdp_axes: Sequence[str], min_size: int
) -> PartitionSpec:
    """Shards the largest dimension divisible by the FSDP axes' size; small arrays stay replicated."""
    axes = tuple(a for a in fsdp_axes if a in mesh.axis_names and mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if not axes or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec: list[Any] = [None] * len(shape)
            spec[dim] = axes if len(axes) > 1 else axes[0]
            return PartitionSpec(*spec)
    return PartitionSpec()


def _explicit_spec(value: Any, shape: Sequence[int], mesh: Mesh, path: str) -> PartitionSpec:
    spec = PartitionSpec(*value)
    if len(spec) > len(shape):
        raise ConfigError(
            f"Sharding rule {value!r} has more dims than '{path}' of shape {tuple(shape)}."
        )
    for dim, axis in zip(shape, spec, strict=False):
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            raise ConfigError(
                f"Sharding rule {value!r} for '{path}': dim {dim} is not divisible by {size}."
            )
    return spec


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, config: Any) -> PartitionSpec:
    rules = tree.check_rules(config.sharding_strategy, "sharding_strategy")
    strategy = tree.first_match(path, rules, default="fsdp")
    if strategy == "fsdp":
        return fsdp_spec(shape, mesh, config.fsdp_axes, int(config.fsdp_min_size))
    if strategy in ("replicate", None):
        return PartitionSpec()
    if isinstance(strategy, (list, tuple)):
        return _explicit_spec(strategy, shape, mesh, path)
    raise ConfigError(
        f"Unknown sharding strategy {strategy!r} for '{path}': use 'fsdp', "
        "'replicate' or a tuple partition spec such as (None, 'fsdp')."
    )


def _keystr(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_shardings(abstract: Any, mesh: Mesh, config: Any) -> Any:
    """NamedShardings for a tree of ShapeDtypeStructs (params, optimizer state, ...).

    A leaf of the optimizer state (`opt/0/mu/img/...`) follows the rule of the parameter path it ends with, so moments
    are sharded like their parameters.
    """

    def one(path, leaf):
        key = _keystr(path)
        shape = getattr(leaf, "shape", ())
        parts = key.split("/")
        # Use the longest suffix that some rule other than the catch-all matches, else the full path.
        candidates = ["/".join(parts[i:]) for i in range(len(parts))]
        chosen = next((c for c in candidates if _specific_rule(c, config)), key)
        return NamedSharding(mesh, spec_for(chosen, shape, mesh, config))

    return jax.tree_util.tree_map_with_path(one, abstract)


def _specific_rule(path: str, config: Any) -> bool:
    for pattern, _ in tree.check_rules(config.sharding_strategy, "sharding_strategy"):
        if pattern not in (".*", ".+") and re.fullmatch(pattern, path):
            return True
    return False


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def describe(shardings: Mapping) -> dict[str, str]:
    """path -> partition spec string, for logging which params are sharded how."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {_keystr(p): str(s.spec) for p, s in flat}


def put_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """This host's numpy batch -> global jax arrays split over the batch axes of the mesh."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


# (mesh shape, axes) recorded by `set_mesh`: the run's config.batch_axes, for model code that cannot see it.
_CONFIGURED_BATCH_AXES: contextvars.ContextVar[tuple[tuple, tuple[str, ...]] | None] = (
    contextvars.ContextVar("cappa_configured_batch_axes", default=None)
)


@contextlib.contextmanager
def set_mesh(mesh: Mesh, config_axes: Sequence[str] | None = None) -> Iterator[Mesh]:
    """`jax.set_mesh(mesh)` that also records the run's batch axes (`config.batch_axes`).

    Model code's `constrain_batch` and `per_batch_shard` (the CPU kernels' `grad_barrier`) split dim 0 over
    these axes when they are not told otherwise; None = every mesh axis of size > 1, as with a plain
    `jax.set_mesh`. The loop traces its steps, init and evaluators under it. JAX does not key its trace
    caches on these axes: a function jitted once is not re-traced when only the recorded axes change.
    """
    axes = batch_axes(mesh, config_axes) if config_axes else None
    token = _CONFIGURED_BATCH_AXES.set((mesh.shape_tuple, axes) if axes else None)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _CONFIGURED_BATCH_AXES.reset(token)


def _batch_axes(batch_axes: Sequence[str] | str | None) -> tuple[tuple[str, ...], int]:
    """(the context mesh's Auto axes the batch is split over, their total size); ((), 1) without a mesh.

    ``batch_axes`` None: the axes `set_mesh` recorded for this mesh, else every axis of size > 1.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    configured = _CONFIGURED_BATCH_AXES.get()
    if batch_axes is None and configured is not None and configured[0] == mesh.shape_tuple:
        batch_axes = configured[1]
    if batch_axes is None:
        axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    else:
        axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"constrain_batch: axes {unknown} are not axes of the mesh {mesh.axis_names}; "
                "pass names from config.mesh (or None for all of them)."
            )
    axes = tuple(a for a in axes if a in mesh.auto_axes)
    return axes, math.prod(mesh.shape[a] for a in axes)


def constrain_batch(x: Any, batch_axes: Sequence[str] | None = None) -> Any:
    """Asks XLA to keep dim 0 of an activation (or each leaf of a pytree) split over the batch axes.

    For model code: a no-op outside a mesh context (`set_mesh` / `jax.set_mesh`; the train loop, the jitted init
    and the evaluators run under `set_mesh(mesh, config.batch_axes)`), so the same model runs un-annotated
    anywhere else. `batch_axes` None = the axes `set_mesh` recorded (the loop's batch sharding), else every mesh
    axis of size > 1. Only axes of type Auto take part (inside `shard_map` the manual axes are already split).
    A leaf whose dim 0 the axes' total size does not divide is returned unchanged.
    """
    axes, shards = _batch_axes(batch_axes)

    def one(leaf: Any) -> Any:
        shape = getattr(leaf, "shape", ())
        if not axes or not shape or shape[0] % shards:
            return leaf
        spec = PartitionSpec(axes, *[None] * (len(shape) - 1))
        return jax.lax.with_sharding_constraint(leaf, spec)

    return jax.tree.map(one, x)


def per_batch_shard(fn: Any, x: jax.Array) -> jax.Array:
    """``fn(x)`` run on each device's own batch shard (dim 0 split as `constrain_batch` splits it).

    For element-wise ``fn`` that must not communicate: under a mesh, a data-dependent scalar read from a
    sharded array (``x[0]``) costs a cross-device collective; inside `jax.shard_map` it is local. The batch
    axes are `constrain_batch`'s default (the run's `config.batch_axes` under `set_mesh`). Without a mesh, or
    when the batch axes do not divide dim 0, it is plain ``fn(x)``.
    """
    axes, shards = _batch_axes(None)
    if not axes or not x.ndim or x.shape[0] % shards:
        return fn(x)
    spec = PartitionSpec(axes, *[None] * (x.ndim - 1))
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, axis_names=set(axes))(x)
