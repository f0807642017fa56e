"""XLA:CPU compile time vs step time under the tests' compiler flags; prints one JSON object.

    .venv/bin/python benchmarks/xla_cpu_compile.py [--rounds 3] [--steps 5] [--quick]

Why: the test suite compiles hundreds of small programs once each, so its time is mostly XLA:CPU compiling
(tests/conftest.py sets the two compile flags measured here; its third, single-threaded Eigen, is about two
xdist workers sharing two cores and is not measured here). A flag that makes compiling cheaper may make the compiled
step slower, which is what a user's run pays; this script measures both, so the suite's flags and the
users' defaults are chosen on numbers.

* Settings: XLA's defaults; the older loop emitters (`--xla_cpu_use_fusion_emitters=false`); `-O0` (LLVM
  back end at -O0); both (the suite's). Each runs in its own child process (`child_env.py`: XLA reads
  its flags once), one device, huge-page malloc.
* Models: the tests' tiny CapPa (`tests/helpers.py`: width 32, one block per tower, 32 px, batch 16) and the
  demo's (`configs/cappa_tiny.py`: width 128, 4 + 1 blocks, 64 px, batch 64), each the engine's own jitted
  step from `transfer.train.setup()` on a synthetic batch.
* Per model: `compile_s` (lowering excluded, the persistent cache off), and `step_s`, the median over
  `--steps` back-to-back steps after a warm-up step.
* Rounds: every round runs each setting's child once, the order rotating, so the settings share the
  machine's drift; the JSON has each round's figures and the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from statistics import median

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from child_env import child_env  # noqa: E402

SETTINGS = {
    "default": (),
    "loop_emitters": ("--xla_cpu_use_fusion_emitters=false",),
    "O0": ("--xla_backend_optimization_level=0",),
    "O0_loop_emitters": (
        "--xla_backend_optimization_level=0",
        "--xla_cpu_use_fusion_emitters=false",
    ),
}
BLOCK = dict(norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False)
MODELS = {  # image side, batch, towers
    "tests_tiny": dict(
        image=32,
        batch=16,
        img=dict(width=32, depth=1, num_heads=2, patch_size=8, num_registers=2, **BLOCK),
        txt=dict(vocab_size=120, depth=1, max_len=24, **BLOCK),
    ),
    "demo_tiny": dict(
        image=64,
        batch=64,
        img=dict(
            width=128, depth=4, mlp_dim=384, num_heads=4, patch_size=16, num_registers=4, **BLOCK
        ),
        txt=dict(vocab_size=256, depth=1, mlp_dim=384, max_len=32, posemb="learn", **BLOCK),
    ),
}


def _log(message: str) -> None:
    print(f"[xla-cpu-compile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _config(spec: dict):
    import ml_collections

    from transfer import train

    c = ml_collections.ConfigDict()
    c.task = "pretrain.cappa_task"
    c.input = dict(data=dict(name="unused", split="train"), batch_size=spec["batch"], pp="")
    c.model = dict(img=dict(spec["img"], pool_type="none"), txt=spec["txt"])
    c.update(optax_name="adamw", lr=1e-3, wd=0.0, total_steps=100, log_flops=False, evals={})
    return train.prepare_config(c)[0]


def measure(name: str, steps: int) -> dict:
    """One model in this process: compile seconds of the engine's step, then seconds per step."""
    import cappa_step
    import jax

    spec = MODELS[name]
    batch = cappa_step.synthetic_batch(name, spec=spec)
    # EngineStep compiles inside; time it around the compile only (lowering happens first, untimed).
    stages = {}
    compile_of = jax.stages.Lowered.compile

    def timed_compile(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return compile_of(self, *args, **kwargs)
        finally:
            stages["compile_s"] = time.perf_counter() - t0

    jax.stages.Lowered.compile = timed_compile
    try:
        step = cappa_step.EngineStep(name, config=_config(spec), batch=batch)
    finally:
        jax.stages.Lowered.compile = compile_of
    times = [step.run(1) for _ in range(steps)]
    return {"compile_s": round(stages["compile_s"], 3), "step_s": round(median(times), 4)}


def child(steps: int) -> dict:
    import jax

    jax.config.update(
        "jax_enable_compilation_cache", False
    )  # compile every time, not once per machine
    return {name: measure(name, steps) for name in MODELS}


def _run_child(setting: str, steps: int) -> dict:
    # Exactly the setting's flags: an XLA_FLAGS in this shell (the tests' flags, say) is not inherited.
    base = dict(os.environ, XLA_FLAGS="")
    env = child_env(1, "hugepages", extra_xla_flags=SETTINGS[setting], base=base)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"child for setting {setting!r} failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def benchmark(rounds: int, steps: int) -> dict:
    t0, load_start = time.perf_counter(), os.getloadavg()
    names = list(SETTINGS)
    per_round = {s: [] for s in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for setting in order:
            _log(f"round {r + 1}/{rounds}: {setting}")
            per_round[setting].append(_run_child(setting, steps))
    medians = {
        s: {
            m: {
                k: round(median(rd[m][k] for rd in per_round[s]), 4)
                for k in ("compile_s", "step_s")
            }
            for m in MODELS
        }
        for s in names
    }
    base = medians["default"]
    ratios = {
        s: {
            m: {k: round(medians[s][m][k] / base[m][k], 3) for k in ("compile_s", "step_s")}
            for m in MODELS
        }
        for s in names
        if s != "default"
    }
    return {
        "date": datetime.date.today().isoformat(),
        "settings": {s: list(f) for s, f in SETTINGS.items()},
        "rounds": rounds,
        "steps": steps,
        "median": medians,
        "over_default": ratios,
        "per_round": per_round,
        "load_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and child")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step (plumbing check)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    print(json.dumps(benchmark(args.rounds, args.steps), indent=1))


if __name__ == "__main__":
    main()
