"""The accelerator benchmark: CapPa S/16 and B/16 train steps and caption decoding on a GPU or TPU host.

    .venv/bin/python benchmarks/accelerator.py > accelerator.json      # GPU or TPU host, all local devices
    .venv/bin/python benchmarks/accelerator.py --quick                 # CPU: tiny model, smoke test

Prints one JSON object on stdout (progress on stderr); exits 1 if a measurement failed (its entry then
holds `error`, the others are still measured). What it measures, with `model.dtype="bfloat16"` and each
of `model.kernels="xla"` and `"cpu"` (pretrain/linear.py):

* `train`: the engine's CapPa step (`transfer.train.setup()`, built as benchmarks/cappa_step.py builds it:
  only the data source is swapped for one synthetic in-memory batch) with configs/cappa_b16.py's recipe
  (scanned towers, `nothing_saveable` remat, FSDP over `data`, Adafactor, 75 % parallel prediction),
  its ViT swapped for S/16 or B/16, at 224 px, 64 tokens, a 32k vocabulary, over all local devices.
  Step time (median of rounds of back-to-back steps after warm-up steps, compile apart), examples/s and
  MFU = model FLOPs per example (the task's own count on an unscanned, remat-free copy: what the loop logs
  as `perf/flops_per_example`, recomputation excluded) x examples/s / (bf16 peak per device x devices),
  the peak from transfer/flops.py's table by `device_kind` (`--peak_flops` overrides it; on CPU it is a
  measured float32 matmul). Also XLA's memory analysis of the compiled step, per device.
* `decode`: KV-cached greedy caption decoding (pretrain/decode.py, as benchmarks/decode.py times it) of
  64 images on one device, the same two models with random weights and EOS made impossible, so every
  caption runs all 64 tokens: tokens/s of the `generate` call (which encodes the images first, as
  `cappa caption` does), and of the decoding alone (the jitted image encoder's time subtracted).
* `reference`: what the numbers are compared with (BENCHMARKS.md, "the accelerator benchmark").

`--quick` is a plumbing check for CPU: a tiny model (32 px, width 64), 2 examples per device, 2 rounds
of 1 step, decoding 4 images (~35 s of CPU time here, nearly all of it compiling). Its numbers are not
measurements of anything.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import sys
import time
import traceback
from statistics import median

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cappa_step  # noqa: E402
import decode as decode_bench  # noqa: E402  (benchmarks/decode.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from pretrain import cappa  # noqa: E402
from transfer import config as config_lib  # noqa: E402
from transfer import flops, train  # noqa: E402

KERNELS = ("xla", "cpu")
# configs/cappa_b16.py's decoder (6 layers, no biases but the head's and the final norm's), 64 tokens.
TXT = dict(vocab_size=32_000, max_len=decode_bench.TOKENS)
MODELS = {
    "s16": dict(image=224, batch_per_device=256, img=dict(variant="S/16"), txt=TXT),
    "b16": dict(image=224, batch_per_device=128, img=dict(variant="B/16"), txt=TXT),
}
QUICK_MODELS = {
    "tiny": dict(
        image=32,
        batch_per_device=2,
        img=dict(variant=None, width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=8),
        txt=dict(vocab_size=512, max_len=decode_bench.TOKENS, depth=1),
    )
}
MODES = {
    "full": dict(warmup=3, rounds=5, steps=10, decode_batch=64, decode_repeats=5),
    "quick": dict(warmup=1, rounds=2, steps=1, decode_batch=4, decode_repeats=2),
}
# What the numbers are compared with (BENCHMARKS.md). The seed run's MFU is cappa_step.on_paper()'s figure.
REFERENCE = {
    "seed_run": dict(
        cappa_step.SEED,
        mfu=0.247,
        what="CapPa L/16 reproduction on TPU v5e-256: 0.45 s per batch of 8,192",
    ),
    "maxtext_v5e_dense_llm_mfu": [0.55, 0.67],
}


def _log(message: str) -> None:
    print(f"[accelerator-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def model_config(spec: dict, kernels: str, global_batch: int) -> ml_collections.ConfigDict:
    """configs/cappa_b16.py with `spec`'s image tower and decoder sizes, bf16 compute and `kernels`."""
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "cappa_b16.py"))
    config, _ = train.prepare_config(config)
    config_lib.apply_overrides(
        config,
        {
            "model.dtype": "bfloat16",
            "model.kernels": kernels,
            # Key by key: the recipe's other model settings (scan, remat, decoder) stay.
            **{f"model.{tower}.{k}": v for tower in ("img", "txt") for k, v in spec[tower].items()},
            "input.batch_size": global_batch,
            "input.pp": "",
            "tokenizer": None,
            "evals": {},
            "log_flops": False,
            "ckpt_steps": 10**9,
        },
    )
    return config


def _memory(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program (bytes per device), or None where unavailable."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # Not every backend implements it.
        return None
    if m is None:
        return None
    keys = ("argument", "output", "alias", "temp", "generated_code")
    return {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in keys}


def measure_train(
    name: str, spec: dict, kernels: str, devices: list, mode: dict, peak: float
) -> dict:
    """One model under one `kernels` setting: the engine's step, timed after warm-up."""
    n = len(devices)
    global_batch = spec["batch_per_device"] * n
    batch = cappa_step.synthetic_batch(name, spec={**spec, "batch": global_batch})
    t0 = time.perf_counter()
    step = cappa_step.EngineStep(name, model_config(spec, kernels, global_batch), batch, devices)
    if mode["warmup"] > 1:
        step.run(mode["warmup"] - 1)  # EngineStep ran one.
    build_s = time.perf_counter() - t0
    fpe = step.task.flops_per_example(batch)
    times = []
    for r in range(mode["rounds"]):
        times.append(step.run(mode["steps"]))
        _log(f"  {name} kernels={kernels}: round {r + 1}/{mode['rounds']} {times[-1]:.4f} s/step")
    t = median(times)
    examples_per_s = global_batch / t
    out = {
        "step_time_s": round(t, 5),
        "step_time_s_range": [round(min(times), 5), round(max(times), 5)],
        "examples_per_s": round(examples_per_s, 2),
        "examples_per_s_per_device": round(examples_per_s / n, 2),
        "batch": global_batch,
        "batch_per_device": spec["batch_per_device"],
        "model_gflops_per_example": None if fpe is None else round(fpe / 1e9, 3),
        "mfu": None if fpe is None else round(fpe * examples_per_s / (peak * n), 4),
        "setup_compile_warmup_s": round(build_s, 1),
        "compiled_bytes_per_device": _memory(step.step_fn),
    }
    del step
    gc.collect()
    return out


def decode_model(spec: dict, kernels: str) -> cappa.Model:
    """The model of `spec` as configs/cappa_b16.py builds it (scanned, bf16) with `kernels`."""
    config = model_config(spec, kernels, 1)
    return cappa.Model(**cappa.model_kwargs(config.model.to_dict()))


def measure_decode(name: str, spec: dict, kernels: str, mode: dict, params_by_model: dict) -> dict:
    """KV-cached greedy decoding of `decode_batch` images (benchmarks/decode.py's `measure`), random
    parameters (the same for both `kernels`: one tree; kept in `params_by_model`) with EOS impossible."""
    model = decode_model(spec, kernels)
    rng = np.random.default_rng(0)
    size, n = spec["image"], mode["decode_batch"]
    images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    if name not in params_by_model:
        params_by_model[name] = jax.device_put(decode_bench.random_params(model, images[:1]))
    params = params_by_model[name]
    out = decode_bench.measure(model, params, images, "greedy", True, mode["decode_repeats"])
    generate_s = n * decode_bench.TOKENS / out["tokens_per_s"]
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=cappa.Model.encode)[0])
    x = jnp.asarray(images)
    jax.block_until_ready(encode(params, x))
    encode_times = []
    for _ in range(mode["decode_repeats"]):
        t0 = time.perf_counter()
        jax.block_until_ready(encode(params, x))
        encode_times.append(time.perf_counter() - t0)
    encode_s = median(encode_times)
    decode_s = generate_s - encode_s
    return {
        "images": n,
        "tokens_per_caption": decode_bench.TOKENS,
        "generate_s": round(generate_s, 5),
        "tokens_per_s": out["tokens_per_s"],
        "encode_images_s": round(encode_s, 5),
        # The decoding alone; None when the two timings are too close to tell apart.
        "tokens_per_s_without_encode": round(n * decode_bench.TOKENS / decode_s, 1)
        if decode_s > 0.05 * generate_s
        else None,
        "compile_s": out["compile_s"],
    }


def _guarded(what: str, errors: list, fn, *args) -> dict:
    """`fn(*args)`, or {"error": ...} when it fails (out of memory, say): the other measurements
    still run; `what` is appended to `errors`."""
    try:
        return fn(*args)
    except Exception as e:  # Recorded in the JSON and the exit code; the traceback goes to stderr.
        traceback.print_exc(file=sys.stderr)
        errors.append(what)
        return {"error": f"{type(e).__name__}: {str(e)[:1000]}"}


def benchmark(
    quick: bool,
    n_devices: int | None = None,
    peak_override: float | None = None,
    batch_per_device: int | None = None,
    names: list[str] | None = None,
) -> tuple[dict, list]:
    """The JSON object and the list of failed measurements (empty when all ran)."""
    t_start = time.perf_counter()
    mode = MODES["quick" if quick else "full"]
    models = copy.deepcopy(QUICK_MODELS if quick else {n: MODELS[n] for n in names or MODELS})
    if batch_per_device:
        for spec in models.values():
            spec["batch_per_device"] = batch_per_device
    devices = jax.local_devices()[:n_devices] if n_devices else jax.local_devices()
    device = devices[0]
    peak, peak_source = flops.peak_flops_per_device(device, peak_override)
    _log(
        f"{len(devices)} x {device.device_kind} ({device.platform}); peak {peak / 1e12:.4g} TFLOP/s "
        f"per device ({peak_source})"
    )
    errors: list[str] = []
    results: dict = {"train": {}, "decode": {}}
    params_by_model: dict = {}
    for name, spec in models.items():
        for part, fn in (("train", measure_train), ("decode", measure_decode)):
            by_kernels = results[part].setdefault(name, {})
            for kernels in KERNELS:
                _log(f"{part} {name} kernels={kernels}")
                args = (
                    (name, spec, kernels, devices, mode, peak)
                    if part == "train"
                    else (name, spec, kernels, mode, params_by_model)
                )
                by_kernels[kernels] = _guarded(f"{part}/{name}/{kernels}", errors, fn, *args)
            key = "examples_per_s" if part == "train" else "tokens_per_s"
            if all(key in by_kernels[k] for k in KERNELS):
                by_kernels[f"xla_over_cpu_{key}"] = round(
                    by_kernels["xla"][key] / by_kernels["cpu"][key], 3
                )
    out = {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "platform": device.platform,
            "device_kind": device.device_kind,
            "devices": len(devices),
            "local_devices": jax.local_device_count(),
            "processes": jax.process_count(),
            "jax_version": jax.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
        "settings": {
            "mode": "quick" if quick else "full",
            "config": "configs/cappa_b16.py",
            "dtype": "bfloat16",
            "kernels": list(KERNELS),
            "models": models,
            **mode,
        },
        "peak": {"flops_per_device": peak, "source": peak_source},
        **results,
        "reference": REFERENCE,
        "errors": errors,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    return out, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (CPU smoke test)")
    parser.add_argument(
        "--devices", type=int, default=None, help="use the first N local devices (default: all)"
    )
    parser.add_argument(
        "--batch_per_device",
        type=int,
        default=None,
        help="train batch per device (default: S/16 256, B/16 128)",
    )
    parser.add_argument(
        "--peak_flops",
        type=float,
        default=None,
        help="peak FLOP/s per device (default: transfer/flops.py's table)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=None, help="default: all (full mode)"
    )
    parser.add_argument(
        "--allow_cpu",
        action="store_true",
        help="run the full S/16 and B/16 mode on CPU anyway (hours)",
    )
    args = parser.parse_args(argv)
    if not args.quick and jax.default_backend() == "cpu" and not args.allow_cpu:
        parser.error(
            "no GPU or TPU here: run with --quick on CPU (or --allow_cpu for the full mode)"
        )
    out, errors = benchmark(
        args.quick, args.devices, args.peak_flops, args.batch_per_device, args.models
    )
    print(json.dumps(out, indent=2, allow_nan=False), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
