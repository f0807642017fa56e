"""`cappa info --config configs/cappa_l16.py`: parameter counts and FLOPs per example of a CapPa config.

Nothing is allocated: parameters are `jax.eval_shape`d and the FLOPs come from XLA's cost analysis of
*lowered* (never compiled or run) functions on abstract inputs, so the L/16 config answers in seconds
on a laptop. XLA counts the body of a loop once (see transfer/flops.py), so the towers are lowered
unscanned and without remat: the numbers are model FLOPs of every layer. A hand-written estimate
(matmuls and attention only) is printed next to them as a cross-check; the two differ by the
elementwise work (norms, softmax, GELU) that XLA also counts.

The image size comes from `--image_size`, else from the last sizing op of `input.pp`
(`resize(N)`, `central_crop`, `random_crop`, `inception_crop`); the caption length is
`model.txt.max_len`.

With a target (`--device v5e --chips 256 [--batch N] [--mesh fsdp:-1] [--mfu 0.4]`) it also plans the run:
memory per device against the device's, fit or not, step time and days at an assumed MFU (pretrain/plan.py).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from transfer import config as config_lib
from transfer import flops

SIZE_OPS = ("resize", "central_crop", "random_crop", "inception_crop")


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise config_lib.ConfigError(
        f"cannot read an image size from {size!r} (input.pp): expected N or (H, W)"
    )


def image_size_from_pp(pp_string: str) -> tuple[int, int] | None:
    """(H, W) set by the last sizing op on the `image` key of a pp string, or None if there is none."""
    if not pp_string.strip():
        return None
    try:
        node = ast.parse(f"({pp_string.strip()})", mode="eval").body
    except SyntaxError as e:
        raise config_lib.ConfigError(
            f"cannot parse input.pp {pp_string!r}: {e.msg}; fix its syntax or pass --image_size N."
        ) from e
    ops = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        ops.append(node.right)
        node = node.left
    ops.append(node)
    for op in ops:  # Last op first.
        if not (isinstance(op, ast.Call) and isinstance(op.func, ast.Name)):
            continue
        if op.func.id not in SIZE_OPS:
            continue
        kwargs = {k.arg: ast.literal_eval(k.value) for k in op.keywords if k.arg}
        if kwargs.get("key", "image") != "image":
            continue
        size = ast.literal_eval(op.args[0]) if op.args else kwargs.get("size")
        if size is not None:
            return _hw(size)
    return None


def param_counts(params: Any) -> dict[str, int]:
    """Counts of a CapPa parameter tree (arrays or ShapeDtypeStructs): per tower and in total.

    `txt` includes its `txt_embedding` ([MASK] row included) and `txt_head` (kernel and bias).
    """
    size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    txt = params.get("txt", {})
    return {
        "img": size(params.get("img", {})),
        "txt": size(txt),
        "txt_embedding": size(txt.get("embedding", {})),
        "txt_head": size(txt.get("head", {})),
        "total": size(params),
    }


def _block_flops(tokens: int, width: int, mlp_dim: int, mlp_type: str, kv_tokens: int) -> float:
    """Matmul FLOPs of one pre-norm self-attention + MLP block over `tokens` tokens (forward)."""
    proj = 2 * 4 * tokens * width * width  # q, k, v, out
    attn = 2 * 2 * tokens * kv_tokens * width  # q.k and probs.v
    mlp = 2 * (3 if mlp_type == "geglu" else 2) * tokens * width * mlp_dim
    return proj + attn + mlp


def analytic_flops(img_kw: dict, txt_kw: dict, image_hw: tuple[int, int], text_len: int) -> dict:
    """Hand-counted matmul FLOPs per example (2 per multiply-add); elementwise work is ignored.

    The train step is 3x the forward (each matmul has two gradient matmuls of the same size), less
    the patch embedding's input gradient, which nobody asks for (the image is not a parameter).
    """
    ph, pw = _hw(img_kw["patch_size"])
    e, depth = int(img_kw["width"]), int(img_kw["depth"])
    patches = (image_hw[0] // ph) * (image_hw[1] // pw)
    tok = img_kw.get("pool_type") == "tok"
    n_img = patches + int(img_kw.get("num_registers") or 0) + int(tok)
    m = int(img_kw.get("mlp_dim") or 4 * e)
    embed = 2 * patches * ph * pw * 3 * e
    img = embed + depth * _block_flops(n_img, e, m, img_kw.get("mlp_type", "gelu"), n_img)
    if img_kw.get("pool_type") == "map":  # One probe query: q/out on 1 token, k/v on all, MLP on 1.
        img += 2 * 2 * e * e + 2 * 2 * n_img * e * e + 2 * 2 * n_img * e + 2 * 2 * e * m
    if img_kw.get("num_classes"):
        img += 2 * e * int(img_kw["num_classes"])

    d, t = int(txt_kw["width"]), text_len
    md = int(txt_kw.get("mlp_dim") or 4 * d)
    mlp_type = txt_kw.get("mlp_type", "gelu")
    per_block = _block_flops(t, d, md, mlp_type, t)  # self-attention + MLP
    per_block += (
        2 * 2 * t * d * d + 2 * 2 * n_img * e * d + 2 * 2 * t * n_img * d
    )  # cross-attention
    txt = int(txt_kw["depth"]) * per_block + 2 * t * d * int(txt_kw["vocab_size"])
    return {
        "img_forward": float(img),
        "txt_forward": float(txt),
        "train_step": float(3 * (img + txt) - embed),
        "img_tokens": n_img,
    }


def unrolled(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same model without scan and remat: XLA then counts every layer once."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for tower in ("img", "txt"):
            config.model[tower].scan = False
            config.model[tower].remat_policy = "none"
    return config


def abstract_batch(task: Any, image_hw: tuple[int, int], text_len: int, batch: int = 1) -> dict:
    return {
        "image": jax.ShapeDtypeStruct((batch, *image_hw, 3), jnp.float32),
        task.text_key: jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
    }


XLA_PARTS = ("img_forward", "txt_forward", "train_step")


def xla_flops(
    task: Any,
    params: Any,
    image_hw: tuple[int, int],
    text_len: int,
    batch: int = 1,
    parts: Sequence[str] = XLA_PARTS,
) -> dict:
    """XLA cost-analysis FLOPs per example of the lowered image forward, decoder forward and
    forward+backward of the task's training loss (no optimizer update), at a batch of `batch`.

    `params` may be abstract (ShapeDtypeStructs). Lowered only: nothing is compiled or run, and only the
    `parts` asked for are lowered.
    """
    from pretrain import cappa

    data = abstract_batch(task, image_hw, text_len, batch)
    image, labels = data["image"], data[task.text_key]
    rng = jax.eval_shape(jax.random.key, 0)
    model = task.model

    def encode(p, x):
        return model.apply({"params": p}, x, method=cappa.Model.encode)[0]

    def decode(p, tokens, encoded):
        mask = cappa.causal_mask(tokens.shape[1])
        return model.apply({"params": p}, tokens, encoded, mask, method=cappa.Model.decode)

    train = jax.value_and_grad(task.loss_fn, has_aux=True)
    lowered = {
        "img_forward": lambda: jax.jit(encode).lower(params, image),
        "txt_forward": lambda: jax.jit(decode).lower(
            params, labels, jax.eval_shape(encode, params, image)
        ),
        "train_step": lambda: jax.jit(train).lower(params, data, rng),
    }
    out = {k: flops.step_flops(lowered[k]()) for k in parts}
    return {k: None if v is None else v / batch for k, v in out.items()}


def image_size(config: ml_collections.ConfigDict, override: int | None = None) -> tuple[int, int]:
    if override:
        return _hw(int(override))
    hw = image_size_from_pp(config.input.get("pp", "") or "")
    if hw is None:
        raise config_lib.ConfigError(
            "cannot tell the image size: input.pp has no resize(N)/central_crop(N)/random_crop(N)/"
            "inception_crop(N) op on 'image'. Pass --image_size N."
        )
    return hw


def info(config: ml_collections.ConfigDict, image_size_override: int | None = None) -> dict:
    """Parameter counts and FLOPs per example of a CapPa config (merged or not); nothing allocated."""
    from transfer import train

    config, task_module = train.prepare_config(config)
    if not hasattr(task_module, "Task") or "txt" not in config.get("model", {}):
        raise config_lib.ConfigError(
            f"`cappa info` needs a CapPa config (task 'pretrain.cappa_task'), got task {config.task!r}."
        )
    hw = image_size(config, image_size_override)
    text_len = int(config.model.txt.max_len)
    flat_config = unrolled(config)
    task = task_module.Task(flat_config)
    rng = jax.eval_shape(jax.random.key, 0)
    params = jax.eval_shape(task.init_params, rng, abstract_batch(task, hw, text_len))
    from pretrain import cappa

    kw = cappa.model_kwargs(config.model)
    analytic = analytic_flops(kw["img_kw"], kw["txt_kw"], hw, text_len)
    measured = xla_flops(task, params, hw, text_len)
    remat = {t: config.model[t].remat_policy != "none" for t in ("img", "txt")}
    # With remat the backward pass recomputes the forward of the rematerialised towers.
    recompute = sum(measured[f"{t}_forward"] or 0.0 for t, on in remat.items() if on)
    return {
        "config": {
            "task": config.task,
            "image_size": list(hw),
            "text_len": text_len,
            "img_tokens": analytic.pop("img_tokens"),
            "dtype": config.model.dtype,
            "remat": remat,
        },
        "params": param_counts(params),
        "flops_per_example": {
            "xla": measured,
            "analytic": analytic,
            "xla_over_analytic": {
                k: None if measured[k] is None else round(measured[k] / analytic[k], 4)
                for k in analytic
            },
            "train_step_with_remat": None
            if measured["train_step"] is None
            else measured["train_step"] + recompute,
        },
    }


def plan_target(
    config: ml_collections.ConfigDict,
    target: Any,
    result: dict,
    image_size_override: int | None = None,
) -> dict:
    """`info`'s result plus the memory and time plan of `config` on `target` (a `plan.Target`)."""
    from pretrain import plan
    from transfer import train

    entry = flops.table_entry(target.device)
    if entry is None:
        names = "v4, v5e, v5p, v6e, h100, h200, a100, a100-80gb, ..."
        raise config_lib.InputError(
            f"unknown --device {target.device!r}: use a kind of transfer/flops.py ({names})"
        )
    peak, hbm = entry
    config, task_module = train.prepare_config(copy.deepcopy(config))
    # Residuals as traced for the target: what `kernels="auto"` picks on an accelerator, not on this host.
    if config.model.get("kernels") == "auto":
        with config.unlocked():
            config.model.kernels = "xla"
    hw, text_len = image_size(config, image_size_override), int(config.model.txt.max_len)
    example = abstract_batch(plan._task(task_module, config), hw, text_len)
    mesh = plan.abstract_mesh(target.mesh, target.chips)
    target = dataclasses.replace(target, mesh=tuple(mesh.shape.items()))
    memory = plan.memory(config, task_module, mesh, target.batch, example)
    usable = hbm * (1 - target.headroom)
    fpe = result["flops_per_example"]["xla"]["train_step"]
    return {
        "target": {**dataclasses.asdict(target), "peak_flops": peak, "memory_bytes": hbm},
        "memory": memory,
        "fits": memory["total"] <= usable,
        "memory_fraction": memory["total"] / hbm,
        "time": None if fpe is None else plan.time_estimate(fpe, target, int(config.total_steps)),
        "total_steps": int(config.total_steps),
        "flops_per_example": fpe,
        "params": result["params"]["total"],
    }


def _gib(x: float) -> str:
    return f"{x / 2**30:9.3f}"


ROWS = (
    ("params", "parameters"),
    ("opt_state", "optimizer state"),
    ("batch", "input batch"),
    ("gradients", "gradients"),
    ("grad_accumulator", "gradient accumulator"),
    ("grad_sync", "all-reduced gradients"),
    ("saved_activations", "saved activations"),
    ("recompute", "recompute (one layer)"),
    ("cotangents", "backward cotangents"),
    ("weights_kept", "weights kept for bwd"),
    ("fsdp_gather", "FSDP gather (1 layer)"),
    ("input_copy", "input copy"),
)


def describe(config_path: str, planned: dict) -> str:
    """The plan as a table a person reads."""
    t, m = planned["target"], planned["memory"]
    mesh = " x ".join(f"{n}={s}" for n, s in t["mesh"])
    lines = [
        f"{config_path} on {t['chips']} x {t['device']} ({t['memory_bytes'] / 2**30:.1f} GiB, "
        f"{t['peak_flops'] / 1e12:.0f} TFLOP/s bf16 each); mesh {mesh}; global batch {t['batch']:,} "
        f"({m['local_batch']} per device); {planned['params'] / 1e6:,.1f}M parameters, {m['optimizer']}",
        "",
        f"{'per device':26s}{'GiB':>9s}",
    ]
    for key, name in ROWS:
        if m[key]:
            lines.append(f"  {name:24s}{_gib(m[key])}")
    verdict = "FITS" if planned["fits"] else "DOES NOT FIT"
    lines += [
        f"  {'arguments':24s}{_gib(m['arguments'])}   parameters + optimizer state + batch",
        f"  {'temporaries':24s}{_gib(m['temp'])}   peak in the {m['temp_phase']} phase",
        f"  {'total':24s}{_gib(m['total'])}   {planned['memory_fraction']:.0%} of "
        f"{t['memory_bytes'] / 2**30:.1f} GiB: {verdict} (headroom {t['headroom']:.0%})",
    ]
    if planned["time"]:
        tm = planned["time"]
        lines += [
            "",
            f"time at MFU {t['mfu']:.2f} (an assumption, not a measurement; --mfu):",
            f"  {planned['flops_per_example'] / 1e9:,.1f} GFLOP per example (model FLOPs, train step), "
            f"{tm['step_seconds']:.3f} s per step, {tm['images_per_second']:,.0f} images/s, "
            f"{tm['days']:.1f} days for {planned['total_steps']:,} steps",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = config_lib.split_cli_overrides(argv)
    parser = argparse.ArgumentParser(prog="cappa info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="square image side; default: from input.pp's resize(N)",
    )
    target = parser.add_argument_group("plan for a target (memory per device, fit, time)")
    target.add_argument("--device", help="device kind: v4, v5e, v5p, v6e, h100, h200, a100, ...")
    target.add_argument("--chips", type=int, default=1, help="number of devices (chips)")
    target.add_argument(
        "--batch", type=int, default=None, help="global batch; default: the config's"
    )
    target.add_argument(
        "--mesh", default=None, help="e.g. fsdp:-1 or data:16,fsdp:-1; default: the config's"
    )
    target.add_argument(
        "--mfu", type=float, default=0.4, help="assumed MFU for the time (default 0.4)"
    )
    target.add_argument(
        "--headroom", type=float, default=0.1, help="memory kept free (default 0.1)"
    )
    target.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        # Start-up notes (a task's remarks on the config) go to stderr: stdout is the answer alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = _run(args, overrides)
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device and not args.json:
        print(describe(args.config, result["plan"]))
    else:
        print(json.dumps(result, indent=2))
    return 0


def _run(args: argparse.Namespace, overrides: dict) -> dict:
    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(args.config))
    config_lib.apply_overrides(config, overrides)
    result = info(config, args.image_size)
    if args.device:
        from pretrain import plan

        mesh = plan.parse_mesh(args.mesh) if args.mesh else [tuple(a) for a in config.mesh]
        target = plan.Target(
            args.device,
            args.chips,
            args.batch or int(config.input.batch_size),
            tuple(mesh),
            args.mfu,
            args.headroom,
        )
        result["plan"] = plan_target(config, target, result, args.image_size)
    return result
