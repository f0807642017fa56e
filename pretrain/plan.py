"""Will a config fit on a pod, and how long will it take? The planner behind `cappa info --device`.

    cappa info --config configs/cappa_l16.py --device v5e --chips 256 --batch 8192

Nothing is allocated or compiled: every tree is abstract (`jax.eval_shape`, `jax.make_jaxpr`) and the target
mesh is a `jax.sharding.AbstractMesh`, so a laptop answers for a v5e-256. The numbers are for ONE device.

Arguments (live through the whole step; the donated state's outputs alias them):
  * parameters and optimizer state: the task's parameter tree and `tx.init` of the config's optimizer (so
    Adafactor's factored moments, Adam's two float32 copies and a momentum's dtype come out exact), each leaf
    divided as the engine shards it on the target mesh (`sharding.tree_shardings`: FSDP over `fsdp_axes` for
    arrays of at least `fsdp_min_size` elements, the config's rules);
  * the input batch: the global batch split over the batch axes.
Temporaries (XLA's `temp_size_in_bytes`), the larger of two phases:
  * backward: gradients (float32, sharded like their parameters) + saved activations + one layer's
    recomputation + the backward's cotangents + weights kept for the backward + the FSDP working set + a
    copy of the input batch;
  * update: gradients + the all-reduced copy of the gradients of parameters replicated over the batch axes.
  Saved activations are counted by JAX itself, not by a formula: the residuals of `jax.vjp` of the task's
  loss (what the backward pass reads), traced at per-device batch 1 and 2; the difference is the per-example
  share, the rest (weights kept for the backward: compute-dtype casts, gathered FSDP shards) does not grow
  with the batch. Under the config's scan and remat policy these residuals are what the policy keeps per
  layer (nothing_saveable: each layer's input; "none": everything). A rematerialised layer is recomputed in
  the backward: its residuals without remat (its tower traced without remat, difference / depth) are the
  recomputation, for the largest such layer. The cotangents: the backward of the widest op holds its
  output's and inputs' cotangents, taken as 3 arrays the size of the largest single residual (logits over a
  vocabulary, attention probabilities, an MLP's hidden). Under FSDP a layer's weights are gathered whole for
  its matmuls (compute dtype) and each weight gradient exists whole before its reduce-scatter (float32): the
  largest layer (or other array, e.g. a vocabulary head) plus its largest gradient. The input copy: the patch
  embedding's weight gradient reads the images in another layout (seen in XLA:CPU's buffers).
  Towers are taken as scanned: unscanned ones produce their gradients while their activations are freed,
  which the backward phase's sum over-counts.

Time: step = FLOPs per example (model FLOPs: no recomputation, as MFU counts them) * global batch / (chips *
bf16 peak * MFU), with the MFU an assumption (`--mfu`, 0.4 by default) and the peak from transfer/flops.py.

Left out: XLA's own choices on the target (TPU tiles pad small dimensions, e.g. a head dim of 64 to 128; the
scheduler may prefetch the next layer's weights or keep more buffers alive; XLA may rematerialise to fit),
fused or flash attention chosen by the backend (the residuals are traced on this host, with the "xla"
kernels for an accelerator target), collective buffers beyond the above, the runtime's reserved memory and
the program's code (the headroom is for these), and, for the time, communication not hidden behind compute
and input stalls (the MFU stands for all of it). tests/test_plan.py compares the estimate with XLA's
`memory_analysis()` of the real sharded step on CPU devices.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend import core as jex_core
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from transfer import config as config_lib
from transfer import flops, optim, sharding, tree
from transfer import step as step_lib


@dataclasses.dataclass(frozen=True)
class Target:
    """A pod to plan for: a device kind of transfer/flops.py's table, how many, the mesh and global batch."""

    device: str
    chips: int
    batch: int
    mesh: tuple[tuple[str, int], ...]
    # An assumption, not a measurement: the seed L/16 run reached ~0.25 on v5e-256.
    mfu: float = 0.4
    # Share of the device's memory kept free (runtime, program code, estimate error).
    headroom: float = 0.1


def parse_mesh(text: str) -> list[tuple[str, int]]:
    """`"fsdp:-1"` or `"data:16,fsdp:-1"` -> config.mesh's form."""
    out = []
    for part in text.split(","):
        name, _, size = part.strip().partition(":")
        if not name or not size.strip().lstrip("-").isdigit():
            raise config_lib.InputError(
                f"--mesh {text!r}: expected NAME:SIZE[,NAME:SIZE...], e.g. data:16,fsdp:-1"
            )
        out.append((name.strip(), int(size)))
    return out


def abstract_mesh(mesh_cfg: Sequence[tuple[str, int]], chips: int) -> AbstractMesh:
    """`config.mesh` on `chips` devices that need not exist (-1 takes the rest, as `sharding.make_mesh`)."""
    names = tuple(str(n) for n, _ in mesh_cfg)
    sizes = [int(s) for _, s in mesh_cfg]
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or (-1 in sizes and chips % known):
        raise config_lib.InputError(
            f"mesh {list(mesh_cfg)} does not fit {chips} chips: change --mesh or --chips"
        )
    if -1 in sizes:
        sizes[sizes.index(-1)] = chips // known
    if math.prod(sizes) != chips:
        raise config_lib.InputError(
            f"mesh {list(mesh_cfg)} needs {math.prod(sizes)} chips, the target has {chips}: "
            "change --mesh or --chips"
        )
    return AbstractMesh(tuple(sizes), names)


def _nbytes(x: Any) -> int:
    return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs under a tree of NamedShardings."""
    leaves = jax.tree.leaves(abstract)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    return sum(
        int(math.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
        for x, s in zip(leaves, shards, strict=True)
    )


def batch_shards(mesh: Any, config: Any) -> int:
    axes = sharding.batch_axes(mesh, config.batch_axes)
    return math.prod(mesh.shape[a] for a in axes)


def abstract_state(config: Any, task: Any, mesh: Any, example: Mapping[str, Any]) -> dict:
    """The train state as `train.setup` builds it, abstractly: trees, shardings, optimizer, rules.

    `example` maps the batch keys to ShapeDtypeStructs of ONE example (leading dim 1).
    """
    rng = jax.eval_shape(jax.random.key, 0)
    params = jax.eval_shape(task.init_params, rng, dict(example))
    rules = optim.resolve_rules(params, config)
    tx = optim.make_optimizer(config, rules)
    trainable, frozen = tree.partition(params, rules.is_trainable)
    opt = jax.eval_shape(tx.init, trainable)
    param_sh = sharding.tree_shardings(params, mesh, config)
    train_sh, frozen_sh = tree.partition(param_sh, rules.is_trainable)
    return dict(
        params=params,
        trainable=trainable,
        frozen=frozen,
        opt=opt,
        rules=rules,
        tx=tx,
        train_sh=train_sh,
        frozen_sh=frozen_sh,
        opt_sh=sharding.tree_shardings(opt, mesh, config),
    )


def residuals(task: Any, trainable: Any, frozen: Any, batch: Mapping[str, Any]) -> list[Any]:
    """Shapes of what `jax.vjp` of the task's loss keeps for the backward pass (gradients of the trainable
    parameters, as the step takes them), in a fixed order, leaving out residuals that are inputs
    (parameters, the batch): they cost nothing beyond the arguments."""

    def vjp_of_loss(trainable, frozen, batch):
        def loss(p):
            return task.loss_fn(tree.merge(p, frozen), batch, jax.random.key(0))[0]

        return jax.vjp(loss, trainable)[1]

    jaxpr = jax.make_jaxpr(vjp_of_loss)(trainable, frozen, dict(batch)).jaxpr
    inputs, seen, out = set(jaxpr.invars), set(), []
    for v in jaxpr.outvars:
        if isinstance(v, jex_core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        out.append(v.aval)
    return out


def _task(task_module: Any, config: Any) -> Any:
    """`Task(config)` without its start-up notes: the planner builds several variants of one task."""
    with contextlib.redirect_stdout(io.StringIO()):
        return task_module.Task(config)


def _with_batch(example: Mapping[str, Any], b: int) -> dict:
    return {k: jax.ShapeDtypeStruct((b, *v.shape[1:]), v.dtype) for k, v in example.items()}


def _per_example(
    task: Any, state: dict, example: Mapping[str, Any], depths: Sequence[int] = ()
) -> tuple[int, int, int]:
    """(residual bytes per example, residual bytes independent of the batch, bytes per example of the
    largest single residual of one layer), from traces at batch 1 and 2. A scanned stack's residuals
    carry the layers first (`[depth, batch, ...]`): one layer's array is 1/depth of it."""
    one, two = (
        residuals(task, state["trainable"], state["frozen"], _with_batch(example, b))
        for b in (1, 2)
    )
    per_one, per_two = sum(map(_nbytes, one)), sum(map(_nbytes, two))
    largest = 0
    for a, b in zip(one, two, strict=True):
        grows = _nbytes(b) - _nbytes(a)
        stacked = a.shape and a.shape[0] > 1 and a.shape[0] in depths
        largest = max(largest, grows // a.shape[0] if stacked else grows)
    return per_two - per_one, max(2 * per_one - per_two, 0), largest


def towers(model_cfg: Mapping) -> list[tuple[tuple[str, ...], Mapping]]:
    """The layer stacks of a model config: every dict holding `remat_policy` (CapPa: img, txt; a
    classifier: the model itself), with its path inside `config.model`."""
    found = [((), model_cfg)] if "remat_policy" in model_cfg else []
    for key, value in model_cfg.items():
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            found += [((key, *p), t) for p, t in towers(value)]
    return found


def _depth(tower: Mapping) -> int:
    if tower.get("variant"):
        from pretrain import vit

        return int(vit.decode_variant(tower["variant"])["depth"])
    return int(tower["depth"])


def _set(config: ml_collections.ConfigDict, path: tuple[str, ...], key: str, value: Any) -> Any:
    config = copy.deepcopy(config)
    with config.unlocked():
        node = config.model
        for k in path:
            node = node[k]
        node[key] = value
    return config


def activation_model(
    config: Any, task_module: Any, state: dict, example: Mapping[str, Any]
) -> dict[str, Any]:
    """Bytes per example of the saved activations, of one layer's recomputation (the largest
    rematerialised layer) and of the backward's cotangents; and the batch-independent residuals."""
    stacks = towers(config.model)
    depths = sorted({_depth(t) for _, t in stacks if t.get("scan")})
    saved, constant, largest = _per_example(_task(task_module, config), state, example, depths)
    layers = {}
    for path, tower in stacks:
        if tower["remat_policy"] == "none":
            continue
        plain = _task(task_module, _set(config, path, "remat_policy", "none"))
        everything, _, big = _per_example(plain, state, example, depths)
        largest = max(largest, big)
        layers["/".join(path) or "model"] = max(everything - saved, 0) / _depth(tower)
    return {
        "saved_per_example": saved,
        "recompute_per_example": max(layers.values(), default=0.0),
        "recompute_layer_per_example": layers,
        # The backward of the widest op holds its output's cotangent and its inputs': ~3 arrays of the
        # largest residual's size (a vocabulary's logits, attention probabilities, an MLP's hidden).
        "cotangents_per_example": 3 * largest,
        "weights_kept": constant,
    }


def fsdp_working_set(params: Any, itemsize: int) -> int:
    """Bytes FSDP needs whole at one time: a layer's weights gathered in the compute dtype (`itemsize`)
    plus its largest weight gradient in float32 before the reduce-scatter, for the largest layer (a
    `block_i` subtree, or 1/depth of a scanned `blocks` one) or array outside the layers (e.g. a head)."""
    units: dict[str, list[float]] = {}  # unit -> [elements, largest leaf's elements]
    for path, leaf in tree.flatten(params).items():
        parts = path.split("/")
        size = float(math.prod(leaf.shape))
        if "blocks" in parts:
            key, size = "/".join(parts[: parts.index("blocks") + 1]), size / leaf.shape[0]
        elif any(p.startswith("block_") for p in parts):
            key = "/".join(
                parts[: next(i for i, p in enumerate(parts) if p.startswith("block_")) + 1]
            )
        else:
            key = path
        unit = units.setdefault(key, [0.0, 0.0])
        unit[0] += size
        unit[1] = max(unit[1], size)
    return int(max((n * itemsize + big * 4 for n, big in units.values()), default=0))


BACKWARD = (
    "gradients",
    "grad_accumulator",
    "saved_activations",
    "recompute",
    "cotangents",
    "weights_kept",
    "fsdp_gather",
    "input_copy",
)


def _uses_axes(spec: PartitionSpec, axes: Sequence[str]) -> bool:
    used = {a for p in spec if p is not None for a in ((p,) if isinstance(p, str) else p)}
    return bool(used & set(axes))


def memory(
    config: Any, task_module: Any, mesh: Any, global_batch: int, example: Mapping[str, Any]
) -> dict[str, Any]:
    """Bytes per device of a train step of `config` at `global_batch` on `mesh` (real or abstract)."""
    state = abstract_state(config, _task(task_module, config), mesh, example)
    shards = batch_shards(mesh, config)
    if global_batch % shards:
        raise config_lib.InputError(
            f"batch {global_batch} is not divisible by the {shards} batch shards: change --batch or --mesh"
        )
    local = global_batch // shards
    micro = local // int(config.accum_steps)  # activations live per micro-batch
    acts = activation_model(config, task_module, state, example)
    params = shard_bytes(state["trainable"], state["train_sh"]) + shard_bytes(
        state["frozen"], state["frozen_sh"]
    )
    grads = shard_bytes(state["trainable"], state["train_sh"])
    axes = [a for a in sharding.batch_axes(mesh, config.batch_axes) if mesh.shape[a] > 1]
    replicated = [
        (x, s)
        for x, s in zip(
            jax.tree.leaves(state["trainable"]),
            jax.tree.leaves(state["train_sh"], is_leaf=lambda s: isinstance(s, NamedSharding)),
            strict=True,
        )
        if axes and not _uses_axes(s.spec, axes)
    ]
    grad_sync = sum(shard_bytes(x, s) for x, s in replicated)
    fsdp = any(
        _uses_axes(s.spec, [a for a in mesh.axis_names if mesh.shape[a] > 1])
        for s in jax.tree.leaves(state["train_sh"], is_leaf=lambda s: isinstance(s, NamedSharding))
    )
    compute = jnp.dtype(config.model.get("dtype") or "float32")
    out = {
        "params": params,
        "opt_state": shard_bytes(state["opt"], state["opt_sh"]),
        "batch": local * sum(_nbytes(v) for v in example.values()),
        "gradients": grads,
        "grad_sync": grad_sync,
        # Micro-batches (accum_steps > 1) sum their gradients into a second gradient-sized buffer.
        "grad_accumulator": grads if config.accum_steps > 1 else 0,
        "saved_activations": int(micro * acts["saved_per_example"]),
        "recompute": int(micro * acts["recompute_per_example"]),
        "cotangents": int(micro * acts["cotangents_per_example"]),
        # On one device in float32 these are the parameters themselves; else copies (casts, gathers).
        "weights_kept": acts["weights_kept"] if (fsdp or compute != jnp.float32) else 0,
        "fsdp_gather": fsdp_working_set(state["params"], compute.itemsize) if fsdp else 0,
        "local_batch": local,
        "optimizer": config.optax_name,
        "recompute_layers": acts["recompute_layer_per_example"],
    }
    # The patch embedding's weight gradient reads the images in another layout: XLA copies the batch.
    out["input_copy"] = micro * sum(_nbytes(v) for v in example.values())
    out["arguments"] = out["params"] + out["opt_state"] + out["batch"]
    backward = sum(out[k] for k in BACKWARD)
    out["temp"] = max(backward, grads + grad_sync)
    out["temp_phase"] = "backward" if backward >= grads + grad_sync else "update"
    out["total"] = out["arguments"] + out["temp"]
    return out


def time_estimate(flops_per_example: float, target: Target, total_steps: int) -> dict[str, float]:
    peak = flops.table_entry(target.device)[0]
    step = flops_per_example * target.batch / (target.chips * peak * target.mfu)
    return {
        "step_seconds": step,
        "images_per_second": target.batch / step,
        "days": step * total_steps / 86_400,
    }


def lowered_step(
    config: Any, task_module: Any, mesh: Any, global_batch: int, example: Mapping
) -> Any:
    """The real train step, jitted and sharded as `train.setup` does it, lowered on abstract inputs for
    `mesh` (real devices): `.compile().memory_analysis()` is XLA's answer to `memory`'s estimate."""
    task = _task(task_module, config)
    state = abstract_state(config, task, mesh, example)
    axes = sharding.batch_axes(mesh, config.batch_axes)
    batch_sh = sharding.batch_sharding(mesh, axes)
    repl = sharding.replicated(mesh)
    state_sh = {
        "params": state["train_sh"],
        "frozen": state["frozen_sh"],
        "opt": state["opt_sh"],
        "step": repl,
        "rng": repl,
        "first_bad": repl,
    }
    trees = {"params": state["trainable"], "frozen": state["frozen"], "opt": state["opt"]}
    abstract = {
        k: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), v, state_sh[k]
        )
        for k, v in trees.items()
    }
    abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    abstract["rng"] = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
    abstract["first_bad"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    batch = {
        k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype, sharding=batch_sh)
        for k, v in example.items()
    }
    step = step_lib.make_train_step(
        task, state["tx"], config.accum_steps, batch_sh, optim.lr_schedule(config, state["rules"])
    )
    jitted = jax.jit(
        step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=(0,)
    )
    # As the loop traces it: under the mesh, with config.batch_axes recorded where `sharding` can.
    set_mesh = getattr(sharding, "set_mesh", None)
    with set_mesh(mesh, config.batch_axes) if set_mesh else jax.set_mesh(mesh):
        return jitted.lower(abstract, batch)
