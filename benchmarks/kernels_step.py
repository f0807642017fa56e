"""The CapPa train step under each `model.kernels` setting, interleaved in one process; prints one JSON object.

    .venv/bin/python benchmarks/kernels_step.py [--model s16|tiny] [--kernels auto xla] [--rounds 3]
        [--steps 2] [--devices 1] [--malloc default|hugepages]

What and why (issue 21): `model.kernels = "auto"` must keep the XLA:CPU rewrites of `pretrain/linear.py` on
CPU, and "xla" (plain layers, `jax.nn.dot_product_attention`) is what other backends get. On a CPU host this
measures what each setting costs there:

* The steps are `benchmarks/cappa_step.py`'s (`EngineStep`: the engine's jitted step, state and shardings
  from `transfer.train.setup()`, one synthetic batch, float32, towers unscanned) with `model.kernels` set,
  all built in one child process (`child_env.py`: fake device count, malloc setting).
* Rounds as in `cappa_step.timed_rounds`: each round measures the matmul peak, then each setting's
  warm-up step and `--steps` timed steps, the order flipping every round, so the settings share the
  machine's drift. `ratio_per_round` pairs each setting's time with the first setting's in the same round.
* Next to wall time, the process's CPU time (user + sys, all threads) per timed step: on a machine shared
  with other jobs the wall time swings with their load, the CPU time much less (it counts the work,
  not the waiting). `cpu_ratio_per_round` pairs it like `ratio_per_round`.
* `auto_lowers_like_cpu`: the lowered step (StableHLO text) of "auto" equals the one of "cpu", i.e. "auto"
  runs exactly the "cpu" program on CPU (lowering only, no compile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import cappa_step  # noqa: E402
import jax  # noqa: E402
from child_env import MALLOC, child_env  # noqa: E402

from transfer import input_pipeline, sharding, train  # noqa: E402

KERNELS = ("auto", "xla", "cpu")


def _config(name: str, kernels: str):
    config = cappa_step.bench_config(name)
    config.model.kernels = kernels
    return config


def engine_step(name: str, kernels: str) -> cappa_step.EngineStep:
    """`cappa_step.EngineStep(name)` with `model.kernels = kernels`."""
    return cappa_step.EngineStep(name, config=_config(name, kernels))


def lowered_text(name: str, kernels: str) -> str:
    """The step's StableHLO as `train.setup()` builds it (lowered under the run's mesh, not compiled)."""
    batch = cappa_step.synthetic_batch(name)
    workdir = tempfile.mkdtemp(prefix="cappa-kernels-")
    fake = lambda *args, **kwargs: cappa_step._InMemoryIterator(batch)  # noqa: E731
    try:
        with mock.patch.object(input_pipeline, "TrainIterator", fake), cappa_step._quiet():
            run = train.setup(_config(name, kernels), workdir)
        run.mngr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    device_batch = sharding.put_batch(batch, run.batch_sharding)
    with sharding.set_mesh(run.mesh, run.config.batch_axes):
        return run.step_fn.lower(run.state, device_batch).as_text()


def child(args: argparse.Namespace) -> dict:
    out: dict = {"devices": jax.device_count()}
    if "auto" in args.kernels:
        out["auto_lowers_like_cpu"] = lowered_text(args.model, "auto") == lowered_text(
            args.model, "cpu"
        )
    steps = {k: engine_step(args.model, k) for k in args.kernels}
    cpu: dict[str, list[float]] = {k: [] for k in args.kernels}

    def timed(k: str):
        def run(n: int) -> float:
            before = _cpu_s()
            seconds = steps[k].run(n)
            if n == args.steps:  # a timed call (warm-ups are 1-step calls, hence --steps > 1)
                cpu[k].append((_cpu_s() - before) / n)
            return seconds

        return run

    runs = {k: timed(k) for k in args.kernels}
    times, kernel = cappa_step.timed_rounds(
        runs, cappa_step.matmul_peak_gflops, args.rounds, args.steps
    )
    n_steps = args.rounds * args.steps
    out["kernels"] = {
        k: cappa_step.model_summary(k, times, kernel[k], step, n_steps) for k, step in steps.items()
    }
    first = args.kernels[0]
    out["ratio_per_round"] = {
        f"{k}/{first}": [round(t / t0, 4) for t, t0 in zip(times[k], times[first], strict=True)]
        for k in args.kernels[1:]
    }
    out["ratio_median"] = {k: round(median(v), 4) for k, v in out["ratio_per_round"].items()}
    out["cpu_s_per_step_per_round"] = {k: [round(c, 3) for c in v] for k, v in cpu.items()}
    out["cpu_ratio_per_round"] = {
        f"{k}/{first}": [round(c / c0, 4) for c, c0 in zip(cpu[k], cpu[first], strict=True)]
        for k in args.kernels[1:]
    }
    out["cpu_ratio_median"] = {
        k: round(median(v), 4) for k, v in out["cpu_ratio_per_round"].items()
    }
    return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="s16", choices=sorted(cappa_step.MODELS))
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["auto", "xla"],
        choices=KERNELS,
        help="settings to time; ratios are over the first",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps per setting and round (> 1)"
    )
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices of the child")
    parser.add_argument("--malloc", default="hugepages", choices=list(MALLOC))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    if args.steps < 2:
        parser.error("--steps must be > 1: a 1-step call is the warm-up (cappa_step.timed_rounds)")
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    t_start, load_start = time.perf_counter(), os.getloadavg()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *raw]
    env = child_env(args.devices, args.malloc)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    result = {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "results": json.loads(proc.stdout.strip().splitlines()[-1]),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
