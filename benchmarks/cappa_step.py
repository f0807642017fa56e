"""CapPa train-step benchmark: examples/s and MFU of the engine's step; prints one JSON object.

    .venv/bin/python benchmarks/cappa_step.py [--quick] [--malloc default|hugepages|both]

What and why:

* Two models through `pretrain.cappa_task`: a tiny CapPa, and a ViT-S/16-size CapPa (12x384 encoder at
  224 px, 6 decoder layers, vocab 32k, 64 tokens, batch 16), the size at which big_vision's own trainer
  reaches about 44-47% of the matmul peak on this kind of machine: the reference point for the target.
* The step is the one `transfer.train.setup()` builds (same jit, shardings, donation, optimizer). Its
  input pipeline would need a SentencePiece model to make `labels`, so `input_pipeline.TrainIterator`
  is replaced by an in-memory iterator of one synthetic batch: only the data source is swapped.
* 1 and 8 fake CPU devices, one child process each (`--xla_force_host_platform_device_count` must be
  set before JAX starts). Each child interleaves rounds of {matmul peak, tiny steps, S/16 steps}, so
  MFU divides by a peak measured in the same round; the machine drifts, and ratios are what count.
  Each model's timed steps follow one untimed warm-up step of that model (`timed_rounds` says why).
* Each setting runs twice: with the C library's default malloc and with large blocks on transparent
  huge pages (`child_env.py` says why: XLA:CPU re-faults its 2.3 GB temporary buffer every step). The
  children also report kernel (sys) time and page faults per step.
* Model FLOPs are XLA's count of the lowered (global, unpartitioned) step, the number the loop logs as
  `perf/flops_per_example`. The towers are unscanned without remat, so XLA counts every layer.
* "On paper": FLOPs per example of configs/cappa_l16.py (`cappa info`) and the MFU implied by the
  seed run's 0.45 s per batch of 8,192 on 256 TPU v5e chips at 197 bf16 TFLOP/s each.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from statistics import median
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from child_env import MALLOC, child_env  # noqa: E402

from transfer import config as config_lib  # noqa: E402
from transfer import flops, input_pipeline, sharding, train  # noqa: E402

BIG_VISION = dict(
    norm="layernorm", mlp_type="gelu", use_bias=True, pool_type="none", posemb="learn"
)
MODELS = {
    "tiny": dict(
        image=64,
        batch=32,
        img=dict(width=192, depth=4, mlp_dim=768, num_heads=3, patch_size=8, **BIG_VISION),
        txt=dict(vocab_size=4096, depth=2, max_len=32, posemb="learn"),
    ),
    "s16": dict(
        image=224,
        batch=16,
        img=dict(variant="S/16", **BIG_VISION),
        txt=dict(vocab_size=32_000, depth=6, max_len=64, posemb="learn"),
    ),
}
SEED = dict(step_s=0.45, batch=8192, chips=256, peak_per_chip=197e12, config="configs/cappa_l16.py")
PEAK_N = 2048
TARGET_S16_MFU_OVER_PEAK = 0.5
MODES = {"quick": dict(rounds=2, steps=1), "full": dict(rounds=5, steps=2)}


def _log(message: str) -> None:
    print(f"[cappa-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_config(name: str) -> ml_collections.ConfigDict:
    """configs/cappa_b16.py (its optimizer: adafactor, clip 1.0) at benchmark size, float32, unscanned."""
    spec = MODELS[name]
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "cappa_b16.py"))
    config, _ = train.prepare_config(config)
    model = {"dtype": "float32", "img": dict(spec["img"]), "txt": dict(spec["txt"])}
    for tower in ("img", "txt"):
        model[tower].update(scan=False, remat_policy="none")
    config_lib.apply_overrides(
        config,
        {
            "model": model,
            "input.batch_size": spec["batch"],
            "input.pp": "",
            "tokenizer": None,
            "evals": {},
            "mesh": [("data", -1)],
            "log_flops": False,
            "ckpt_steps": 10**9,
        },
    )
    return config


def synthetic_batch(name: str, seed: int = 0, spec: dict | None = None) -> dict[str, np.ndarray]:
    """Images in [-1, 1] and captions of 8..max_len token ids (1..vocab-1), padded with 0.

    `spec` (default `MODELS[name]`): `batch`, `image` (side) and `txt` with `vocab_size`, `max_len`."""
    spec, rng = MODELS[name] if spec is None else spec, np.random.default_rng(seed)
    b, size, t = spec["batch"], spec["image"], spec["txt"]["max_len"]
    image = rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32)
    labels = rng.integers(1, spec["txt"]["vocab_size"], (b, t)).astype(np.int32)
    lengths = rng.integers(8, t + 1, b)
    labels[np.arange(t)[None] >= lengths[:, None]] = 0
    return {"image": image, "labels": labels}


class _InMemoryIterator:
    """Stands in for `input_pipeline.TrainIterator`: the same batch forever (the step is what's timed)."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.batch, self.position = batch, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.position += len(self.batch["image"])
        return self.batch

    def stats(self) -> dict[str, int]:
        return {"input/skipped": 0}


class EngineStep:
    """The engine's jitted step with its state and a device batch, built by `train.setup()`.

    `config` and `batch` default to `bench_config(name)` and `synthetic_batch(name)`; `devices` (default:
    all) restricts the mesh as `train.setup`'s argument does. benchmarks/accelerator.py passes its own.
    """

    def __init__(
        self,
        name: str,
        config: ml_collections.ConfigDict | None = None,
        batch: dict[str, np.ndarray] | None = None,
        devices: list | None = None,
    ):
        batch = synthetic_batch(name) if batch is None else batch
        config = bench_config(name) if config is None else config
        workdir = tempfile.mkdtemp(prefix="cappa-bench-")
        fake = lambda *args, **kwargs: _InMemoryIterator(batch)
        try:
            with mock.patch.object(input_pipeline, "TrainIterator", fake), _quiet():
                run = train.setup(config, workdir, devices)
            run.mngr.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.step_fn, self.state, self.batch_size = run.step_fn, run.state, len(batch["image"])
        self.task = run.task
        self.batch = sharding.put_batch(batch, run.batch_sharding)
        with jax.set_mesh(run.mesh):
            lowered = self.step_fn.lower(self.state, self.batch)
            # The engine's program, compiled once; calling it directly skips a second compile of
            # the call path, and a state whose sharding drifted after step 1 would fail loudly.
            self.step_fn = lowered.compile()
        self.gflops = flops.step_flops(lowered) / 1e9  # global, unpartitioned
        self.gflops_per_device = flops.step_flops(self.step_fn) / 1e9
        self.mesh = run.mesh
        self.run(1)  # warm-up (first-call allocations)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` back-to-back steps, one sync at the end (as the loop does)."""
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            for _ in range(steps):
                self.state, out = self.step_fn(self.state, self.batch)
            jax.block_until_ready((self.state, out))
        return (time.perf_counter() - t0) / steps


def matmul_peak_gflops() -> float:
    """Best of 3 jitted float32 2048^2 matmuls right now (the engine's measurement, uncached)."""
    device = jax.devices()[0]
    return (
        flops.measure_matmul_flops.__wrapped__(device.platform, device.device_kind, PEAK_N, 3) / 1e9
    )


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(sys.stderr)  # stdout is reserved for the JSON


def timed_rounds(
    runs: dict[str, Callable[[int], float]], peak: Callable[[], float], rounds: int, steps: int
) -> tuple[dict[str, list], dict[str, collections.Counter]]:
    """Rounds of {peak, each model}: per model one warm-up step, then `steps` timed ones.

    A training run calls one step back to back. The first S/16 step after a few steps of the other
    model is not that steady state: it took ~1.1 s longer here, as kernel (sys) time with the same
    number of page faults. The warm-up step absorbs it; its time is kept as `<name>_warmup`.
    The model order flips every round. Returns (times by key, summed sys time and page faults of the
    timed steps by model).
    """
    times: dict[str, list] = {"peak": [], **{k: [] for n in runs for k in (n, f"{n}_warmup")}}
    kernel = {name: collections.Counter() for name in runs}
    for r in range(rounds):
        _log(f"{jax.device_count()} device(s): round {r + 1}/{rounds}")
        times["peak"].append(peak())
        for name in list(runs)[:: 1 if r % 2 else -1]:
            times[f"{name}_warmup"].append(runs[name](1))
            before = resource.getrusage(resource.RUSAGE_SELF)
            times[name].append(runs[name](steps))
            after = resource.getrusage(resource.RUSAGE_SELF)
            kernel[name]["sys_s"] += after.ru_stime - before.ru_stime
            kernel[name]["minor_faults"] += after.ru_minflt - before.ru_minflt
    return times, kernel


def model_summary(
    name: str, times: dict[str, list], kernel: collections.Counter, step: EngineStep, n_steps: int
) -> dict:
    """One model's figures from `timed_rounds`' output; `step` gives its FLOPs and batch size."""
    mfus = [step.gflops / (t * p) for t, p in zip(times[name], times["peak"], strict=True)]
    t = median(times[name])
    return {
        "step_time_s": round(t, 4),
        "step_time_s_range": [round(min(times[name]), 4), round(max(times[name]), 4)],
        # The untimed step before each round's timed ones (see `timed_rounds`).
        "warmup_step_s_per_round": [round(w, 4) for w in times[f"{name}_warmup"]],
        "examples_per_s": round(step.batch_size / t, 2),
        "batch": step.batch_size,
        "model_gflops_per_step": round(step.gflops, 2),
        "compiled_gflops_per_device": round(step.gflops_per_device, 2),
        "mfu_vs_matmul_peak": round(median(mfus), 4),
        "mfu_per_round": [round(m, 4) for m in mfus],
        # A second view, not the target's figure: no pairing of rounds.
        "mfu_median_step_over_median_peak": round(step.gflops / (t * median(times["peak"])), 4),
        # Kernel time (page faults, mostly) per step, all threads: see child_env.py.
        "sys_s_per_step": round(kernel["sys_s"] / n_steps, 3),
        "minor_faults_per_step": round(kernel["minor_faults"] / n_steps),
    }


def child(mode: dict) -> dict:
    """One device setting: builds both steps, then `timed_rounds` of peak / tiny / s16."""
    steps = {name: EngineStep(name) for name in MODELS}
    runs = {name: step.run for name, step in steps.items()}
    times, kernel = timed_rounds(runs, matmul_peak_gflops, mode["rounds"], mode["steps"])
    n_steps = mode["rounds"] * mode["steps"]
    models = {n: model_summary(n, times, kernel[n], step, n_steps) for n, step in steps.items()}
    return {"devices": jax.device_count(), "peak_gflops": times["peak"], "models": models}


def _run_child(devices: int, quick: bool, malloc: str) -> dict:
    env = child_env(devices, malloc)
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(
            f"{devices}-device child ({malloc} malloc) failed with exit code {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def on_paper() -> dict:
    """FLOPs/example of the seed config (lowered only) and the MFU of the seed's 0.45 s step."""
    from pretrain import info

    with _quiet():
        config = config_lib.load_config_file(os.path.join(ROOT, SEED["config"]))
        fpe = info.info(config)["flops_per_example"]
    achieved = SEED["batch"] / SEED["step_s"]  # examples/s
    peak = SEED["chips"] * SEED["peak_per_chip"]
    model, remat = fpe["xla"]["train_step"], fpe["train_step_with_remat"]
    return {
        "config": SEED["config"],
        "seed_step": {k: SEED[k] for k in ("step_s", "batch", "chips", "peak_per_chip")},
        "train_gflops_per_example": round(model / 1e9, 2),
        "train_gflops_per_example_with_remat": round(remat / 1e9, 2),
        "examples_per_s": round(achieved, 1),
        "mfu": round(model * achieved / peak, 4),
        "hfu_with_remat": round(remat * achieved / peak, 4),
    }


def _verdict(results: dict) -> dict:
    """Target and 8-over-1-device time ratios of one malloc setting's {1dev, 8dev} results."""
    s16 = {k: v["models"]["s16"]["mfu_vs_matmul_peak"] for k, v in results.items()}
    one, eight = results["1dev"]["models"], results["8dev"]["models"]
    return {
        "mfu_s16": s16,
        "pass": {k: bool(v >= TARGET_S16_MFU_OVER_PEAK) for k, v in s16.items()},
        "time_8dev_over_1dev": {
            name: round(eight[name]["step_time_s"] / one[name]["step_time_s"], 4) for name in one
        },
    }


def benchmark(quick: bool, mallocs: list[str]) -> dict:
    t_start, load_start = time.perf_counter(), os.getloadavg()
    _log("on paper: FLOPs of configs/cappa_l16.py (lowering only)")
    paper = on_paper()
    results = {}
    for malloc in mallocs:
        for devices in (1, 8):
            _log(f"child process with {devices} device(s), {malloc} malloc")
            results.setdefault(malloc, {})[f"{devices}dev"] = _run_child(devices, quick, malloc)
    return {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {
            "mode": "quick" if quick else "full",
            "models": MODELS,
            "malloc": {m: MALLOC[m] for m in mallocs},
            **MODES["quick" if quick else "full"],
        },
        "results": results,
        "on_paper": paper,
        "target": {
            "what": f"S/16 MFU >= {TARGET_S16_MFU_OVER_PEAK} of the measured matmul peak",
            **{malloc: _verdict(by_devices) for malloc, by_devices in results.items()},
        },
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step (plumbing check)")
    parser.add_argument(
        "--malloc",
        default="both",
        choices=[*MALLOC, "both"],
        help="C library malloc setting of the children (child_env.py); both = one child each",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    if args.child:
        print(json.dumps(child(mode)), flush=True)
    else:
        mallocs = list(MALLOC) if args.malloc == "both" else [args.malloc]
        print(json.dumps(benchmark(args.quick, mallocs), indent=2), flush=True)


if __name__ == "__main__":
    main()
