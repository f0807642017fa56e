"""Train-step benchmark of the classifier on the embedded `scenes` data; prints one JSON object.

    .venv/bin/python benchmarks/train_step.py [--quick] [--data_dir DIR]

Why it is built the way it is:

* A small CPU machine drifts between fast and slow states (and other jobs share it), so absolute
  times are only indicative. Every figure is a median over interleaved rounds, and the headline
  numbers are RATIOS of measurements taken back to back in one process (frozen/full, loop/bare),
  which cancel most of the drift. MFU divides by a matmul peak measured in the same rounds.
* The engine step is the one `transfer.train.train` builds (same jit, shardings, donation):
  `train.setup()` returns it with its state and first batch, and `train.run_loop()` runs the loop.
  Re-implementing the set-up here would measure a copy that can drift away from the engine.
* The "bare" step is the same flax model under a hand-written `value_and_grad` + `optax.adamw`
  step on a batch already on device: the floor for the engine step and the loop.
* The 8-device variant needs `--xla_force_host_platform_device_count=8` before JAX starts, so it
  runs in a child process (this file with `--child-8dev`) that prints its own JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from typing import Any
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402

from tasks import classify  # noqa: E402
from transfer import config as config_lib  # noqa: E402
from transfer import input_pipeline, metrics, sharding, train  # noqa: E402

classify_config = config_lib.load_config_module(
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "classify.py"
    )
)

# ViT-Ti width with 4 blocks on 64x64 images, patch 8 (64 tokens): ~0.3-0.6 s per step on 2 cores.
MODEL = dict(width=192, depth=4, mlp_dim=768, num_heads=3, patch_size=8, pool_type="gap")
BATCH = 32
FROZEN_SCHEDULE = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=20))]
PEAK_N = 2048
_MATMUL = jax.jit(jnp.matmul)
TARGETS = {"frozen_over_full_time": 0.5, "loop_over_bare": 1.05, "input_wait_frac": 0.05}
MODES = {  # Interleaved rounds x steps per round; loop steps (a multiple of its log interval).
    "quick": dict(rounds=3, steps=3, loop_steps=25, log_every=5, child_rounds=2),
    "full": dict(rounds=9, steps=5, loop_steps=150, log_every=10, child_rounds=6),
}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_config(
    data_dir: str, *, frozen: bool = False, total_steps: int = 100, log_every: int = 10
) -> ml_collections.ConfigDict:
    """configs/classify.py at benchmark size, overridden the way `cappa train --config.x=...` does.

    No evaluators and no mid-run checkpoints: they would land inside the loop's timed windows.
    The frozen schedule is an override, not `get_config("frozen")`, which raises a TypeError.
    """
    config, _ = train.prepare_config(classify_config.get_config())
    overrides: dict[str, Any] = {
        "model": dict(MODEL),
        "input.batch_size": BATCH,
        "input.data.data_dir": data_dir,
        "evals": {},
        "total_steps": total_steps,
        "log_training_steps": log_every,
        "ckpt_steps": 10**9,
    }
    if frozen:
        overrides["schedule"] = FROZEN_SCHEDULE
    config_lib.apply_overrides(config, overrides)
    return config


def matmul_peak_gflops(reps: int = 3) -> float:
    """Best-of-`reps` GFLOP/s of a jitted float32 PEAK_N^3 matmul: what the CPU does right now."""
    a = jax.random.normal(jax.random.key(0), (PEAK_N, PEAK_N), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (PEAK_N, PEAK_N), jnp.float32)
    _MATMUL(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        _MATMUL(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_N**3 / best / 1e9


class _Stepper:
    """A jitted `step_fn(state, batch) -> (state, out)` with its state and a device batch."""

    step_fn: Any
    state: Any
    batch: Any
    gflops_per_device: float

    def _compile_and_warm_up(self) -> None:
        # On a sharded step XLA reports the FLOPs of ONE device's partitioned program.
        compiled = self.step_fn.lower(self.state, self.batch).compile()
        self.gflops_per_device = float(compiled.cost_analysis()["flops"]) / 1e9
        self.run(1)  # The call path has its own cache: compile it outside the timings.

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` back-to-back steps (one sync at the end, as in a real loop)."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, out = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, out))
        return (time.perf_counter() - t0) / steps


class EngineStep(_Stepper):
    """The jitted step, state and one device batch exactly as `train.train` would run them."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
        workdir = tempfile.mkdtemp(prefix="cappa-bench-")
        try:
            with _quiet():
                run = train.setup(config, workdir, devices=devices)
            run.mngr.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.step_fn, self.state = run.step_fn, run.state
        self.numpy_batch = run.first_batch
        self.batch = sharding.put_batch(self.numpy_batch, run.batch_sharding)
        self._compile_and_warm_up()


class BareStep(_Stepper):
    """The floor: the same flax model, a textbook adamw step, the batch already on device."""

    def __init__(self, numpy_batch: dict):
        model_cfg = ml_collections.ConfigDict(dict(classify.DEFAULTS["model"], **MODEL))
        self.model = classify.Classifier(42, classify.vit_kwargs(model_cfg))
        image = jnp.asarray(numpy_batch["image"])
        self.batch = {"image": image, "label": jnp.asarray(numpy_batch["label"])}
        params = self.model.init({"params": jax.random.key(0)}, image[:1])["params"]
        kernels = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: k[-1].key == "kernel", p)
        tx = optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4, mask=kernels)
        )
        self.state = (params, tx.init(params))

        def step(state, batch):
            params, opt = state

            def loss_fn(p):
                logits, _ = self.model.apply({"params": p}, batch["image"], train=True)
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, batch["label"]
                ).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        self.step_fn = jax.jit(step, donate_argnums=(0,))
        self._compile_and_warm_up()


def _quiet() -> contextlib.AbstractContextManager:
    """The engine prints progress lines to stdout; stdout is reserved for the JSON result."""
    return contextlib.redirect_stdout(sys.stderr)


def run_loop(config: ml_collections.ConfigDict, bare: BareStep) -> dict:
    """Runs the real loop with the bare step interleaved window by window; returns per-window figures.

    Right after each logging sync (and after the compiling first step) the wrapped step call first
    runs the bare step for as many steps as the coming window holds. The device is idle there (the log
    fetched every pending metric), so the two never overlap; the injected seconds are taken out of the
    window's logged `steps_per_sec` and `input_wait_frac`. Each loop window is then compared with the
    bare run just before it, which cancels the machine's drift.
    A host-side profile sums, per measured step, `next(data_iter)`, `sharding.put_batch`, the step call
    (asynchronous dispatch), the loop's own `jax.device_get` calls (where the host waits for the
    device) and `MetricsWriter.write`; `other` is the rest.
    """
    every = config.log_training_steps
    # Calls outside the timed windows: the first batch and step 1 (compile), or the last log row.
    outside = {
        "next": slice(1, None),
        "put": slice(1, None),
        "call": slice(1, None),
        "device_get": slice(None),
        "metrics_write": slice(None, -1),
    }
    prof: dict[str, list] = {k: [] for k in outside}
    injected: dict[int, tuple[float, float]] = {}  # call index -> (seconds, bare s/step)

    def timed(fn, key, only_from=None):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if only_from is None or sys._getframe(1).f_globals.get("__name__") == only_from:
                prof[key].append(time.perf_counter() - t0)
            return out

        return wrapper

    def instrument(run: train.Run) -> None:
        step_call = timed(run.step_fn, "call")

        def step_with_bare(state, batch):
            call = len(prof["call"])  # Runs step `call + 1` (a fresh run starts at step 0).
            if call == 1 or (call >= every and call % every == 0):
                t0 = time.perf_counter()
                per_step = bare.run(every - 1 if call == 1 else every)
                injected[call] = (time.perf_counter() - t0, per_step)
            return step_call(state, batch)

        run.step_fn = step_with_bare

    patches = [
        (
            input_pipeline.TrainIterator,
            "__next__",
            timed(input_pipeline.TrainIterator.__next__, "next"),
        ),
        (sharding, "put_batch", timed(sharding.put_batch, "put")),
        (jax, "device_get", timed(jax.device_get, "device_get", train.__name__)),
        (metrics.MetricsWriter, "write", timed(metrics.MetricsWriter.write, "metrics_write")),
    ]
    workdir = tempfile.mkdtemp(prefix="cappa-bench-loop-")
    try:
        with contextlib.ExitStack() as stack:
            for obj, name, new in patches:
                stack.enter_context(mock.patch.object(obj, name, new))
            stack.enter_context(_quiet())
            run = train.setup(config, workdir, devices=jax.devices()[:1])
            instrument(run)
            train.run_loop(run)
        rows = [
            r
            for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "steps_per_sec" in r
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    windows, previous = [], 1  # The first window starts after step 1 (compile excluded).
    for row in rows:
        steps = row["step"] - previous
        elapsed = steps / row["steps_per_sec"]
        seconds, bare_step = injected[previous]  # Injected at the call that runs step previous + 1.
        windows.append(
            {
                "steps": steps,
                "loop_step_s": round((elapsed - seconds) / steps, 4),
                "bare_step_s": round(bare_step, 4),
                "input_wait_frac": round(row["input_wait_frac"] * elapsed / (elapsed - seconds), 4),
            }
        )
        previous = row["step"]
    measured = sum(w["steps"] for w in windows)
    per_step = {k: 1e3 * sum(v[outside[k]]) / measured for k, v in prof.items()}
    per_step["loop_step"] = 1e3 * sum(w["loop_step_s"] * w["steps"] for w in windows) / measured
    per_step["other"] = per_step["loop_step"] - sum(
        v for k, v in per_step.items() if k != "loop_step"
    )
    return {
        "windows": windows,
        "profile_ms_per_step": {k: round(v, 3) for k, v in per_step.items()},
    }


def _variant(times: list[float], gflops: float, peaks: list[float]) -> dict:
    """Figures of one variant from its per-round step times (median, spread, throughput, MFU).

    MFU is the median over rounds of FLOPs / (step time x the peak measured in the same round), so a
    round in a slow machine state is compared with a slow peak; `peaks` has one entry per round, or
    one entry for all.
    """
    t = median(times)
    peaks = peaks * len(times) if len(peaks) == 1 else peaks
    mfu = median([gflops / (x * p) for x, p in zip(times, peaks, strict=True)])
    return {
        "step_time_s": round(t, 4),
        "step_time_s_min": round(min(times), 4),
        "step_time_s_max": round(max(times), 4),
        "examples_per_s": round(BATCH / t, 2),
        "model_gflops_per_step": round(gflops, 3),
        "mfu": round(mfu, 4),
    }


def child_8dev(data_dir: str, mode: dict) -> dict:
    """In the 8-fake-device process: the engine step on all 8 devices and on 1 of them, interleaved
    with the matmul peak, so the 8-vs-1 ratio is measured in one process."""
    assert jax.device_count() == 8, jax.devices()
    eight = EngineStep(bench_config(data_dir))
    one = EngineStep(bench_config(data_dir), devices=jax.devices()[:1])
    times: dict[str, list] = {"peak": [], "8dev": [], "1dev": []}
    for r in range(mode["child_rounds"]):
        times["peak"].append(matmul_peak_gflops())
        for name, step in [("8dev", eight), ("1dev", one)][:: 1 if r % 2 else -1]:
            times[name].append(step.run(mode["steps"]))
    return {
        "times": times,
        "gflops_per_device_8dev": eight.gflops_per_device,
        "gflops_1dev": one.gflops_per_device,
    }


def _run_child(data_dir: str, quick: bool) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip(),
    )
    cmd = [sys.executable, os.path.abspath(__file__), "--child-8dev", "--data_dir", data_dir]
    proc = subprocess.run(
        cmd + (["--quick"] if quick else []),
        env=env,
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"8-device child failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(data_dir: str, quick: bool) -> dict:
    """All measurements of the parent process, then the 8-device child; returns the result JSON."""
    mode = MODES["quick" if quick else "full"]
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    with _quiet():  # dataset generation reports to stdout, which is for the one JSON object
        input_pipeline.get_builder({"name": "scenes", "split": "train", "data_dir": data_dir})
    _log("building the engine steps (full, frozen) and the bare step")
    full = EngineStep(bench_config(data_dir))
    frozen = EngineStep(bench_config(data_dir, frozen=True))
    bare = BareStep(full.numpy_batch)

    times: dict[str, list] = {"peak": [], "full": [], "frozen": [], "bare": []}
    for r in range(mode["rounds"]):
        _log(f"round {r + 1}/{mode['rounds']}")
        times["peak"].append(matmul_peak_gflops())
        steppers = [("full", full), ("frozen", frozen), ("bare", bare)]
        for name, step in (
            steppers[r % 3 :] + steppers[: r % 3]
        ):  # Rotate: no variant always goes first.
            times[name].append(step.run(mode["steps"]))
        if r == mode["rounds"] // 2:
            _log("running transfer.train.train with the bare step interleaved")
            loop = run_loop(
                bench_config(data_dir, total_steps=mode["loop_steps"], log_every=mode["log_every"]),
                bare,
            )

    _log("8-device child process")
    child = _run_child(data_dir, quick)
    peak = median(times["peak"])
    per_round = lambda a, b: median([x / y for x, y in zip(times[a], times[b], strict=True)])

    variants = {
        "full_1dev": _variant(times["full"], full.gflops_per_device, times["peak"]),
        "frozen_1dev": _variant(times["frozen"], frozen.gflops_per_device, times["peak"]),
        "bare_1dev": _variant(times["bare"], bare.gflops_per_device, times["peak"]),
    }
    # The child's variants use the child's own peaks. Model FLOPs = the unsharded program's.
    eight = _variant(child["times"]["8dev"], child["gflops_1dev"], child["times"]["peak"])
    eight["compiled_gflops_per_device"] = round(child["gflops_per_device_8dev"], 3)
    eight["compiled_gflops_all_devices"] = round(8 * child["gflops_per_device_8dev"], 3)
    variants["full_8dev"] = eight
    variants["full_1dev_in_8dev_process"] = _variant(
        child["times"]["1dev"], child["gflops_1dev"], child["times"]["peak"]
    )

    windows = loop["windows"]
    wait_fracs = [w["input_wait_frac"] for w in windows]
    loop_fig = _variant([w["loop_step_s"] for w in windows], full.gflops_per_device, [peak])
    loop_fig.update(
        input_wait_frac=round(median(wait_fracs), 4), input_wait_frac_max=round(max(wait_fracs), 4)
    )
    variants["loop_1dev"] = loop_fig
    loop_over_bare = median([w["loop_step_s"] / w["bare_step_s"] for w in windows])

    ratios = {
        "frozen_over_full_time": per_round("frozen", "full"),
        "frozen_over_full_flops": frozen.gflops_per_device / full.gflops_per_device,
        "engine_step_over_bare": per_round("full", "bare"),
        "loop_over_bare": loop_over_bare,
        "loop_over_bare_total_time": (
            sum(w["loop_step_s"] * w["steps"] for w in windows)
            / sum(w["bare_step_s"] * w["steps"] for w in windows)
        ),
        "loop_over_engine_step": loop_over_bare / per_round("full", "bare"),
        "input_wait_frac": median(wait_fracs),
        "eight_over_one_device_time": median(
            [a / b for a, b in zip(child["times"]["8dev"], child["times"]["1dev"], strict=True)]
        ),
        "bare_over_engine_flops": bare.gflops_per_device / full.gflops_per_device,
    }
    return {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform,
            "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {
            "mode": "quick" if quick else "full",
            "model": MODEL,
            "batch": BATCH,
            "image": [64, 64, 3],
            "rounds": mode["rounds"],
            "steps_per_round": mode["steps"],
            "loop_steps": mode["loop_steps"],
            "log_training_steps": mode["log_every"],
            "child_rounds": mode["child_rounds"],
        },
        "peak": {
            "gflops": round(peak, 2),
            "gflops_min": round(min(times["peak"]), 2),
            "gflops_max": round(max(times["peak"]), 2),
            "child_gflops": round(median(child["times"]["peak"]), 2),
            "what": f"best of 3 jitted float32 {PEAK_N}x{PEAK_N} matmuls per round; median "
            "over rounds (the loop's MFU uses it; other MFUs use each round's peak)",
        },
        "variants": variants,
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "loop_windows": windows,
        "loop_profile_ms_per_step": loop["profile_ms_per_step"],
        "targets": {
            k: {
                "value": round(ratios[k], 4),
                "target": f"<= {limit}",
                "pass": bool(ratios[k] <= limit),
            }
            for k, limit in TARGETS.items()
        },
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (~1-2 min)")
    parser.add_argument(
        "--data_dir",
        default=os.path.join(tempfile.gettempdir(), "cappa-bench-tfds"),
        help="TFDS data_dir; `scenes` is generated there on first use",
    )
    parser.add_argument("--child-8dev", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    if args.child_8dev:
        print(json.dumps(child_8dev(args.data_dir, mode)), flush=True)
    else:
        print(json.dumps(benchmark(args.data_dir, args.quick), indent=2), flush=True)


if __name__ == "__main__":
    main()
