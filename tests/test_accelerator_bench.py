"""benchmarks/accelerator.py --quick on CPU: a smoke test of the accelerator benchmark's plumbing.

It runs the script as the first GPU/TPU host will (one command, one JSON object on stdout) and checks the
object's keys and that its figures are finite and positive. Timings are never compared with anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from child_env import child_env  # noqa: E402

# One device; XLA:CPU without its expensive LLVM passes: the compiles dominate, the code is the same.
FAST_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
TRAIN_KEYS = (
    "step_time_s",
    "examples_per_s",
    "examples_per_s_per_device",
    "batch",
    "batch_per_device",
    "model_gflops_per_example",
    "mfu",
    "setup_compile_warmup_s",
)
DECODE_KEYS = ("images", "generate_s", "tokens_per_s", "encode_images_s", "compile_s")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_quick_mode_prints_one_json_object_with_finite_positive_figures():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator.py"), "--quick"],
        env=child_env(1, extra_xla_flags=FAST_COMPILE),
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # the whole of stdout is one object; progress went to stderr
    assert set(out) == {
        "machine",
        "settings",
        "peak",
        "train",
        "decode",
        "reference",
        "errors",
        "wall_time_s",
    }
    assert out["errors"] == []
    assert out["machine"]["platform"] == "cpu" and out["machine"]["devices"] == 1
    assert out["settings"]["mode"] == "quick" and out["settings"]["kernels"] == ["xla", "cpu"]
    assert _positive(out["peak"]["flops_per_device"]) and out["peak"]["source"]
    models = list(out["settings"]["models"])
    assert list(out["train"]) == models and list(out["decode"]) == models
    for name in models:
        train, decode = out["train"][name], out["decode"][name]
        for kernels in ("xla", "cpu"):
            assert all(_positive(train[kernels][k]) for k in TRAIN_KEYS), train[kernels]
            assert all(_positive(decode[kernels][k]) for k in DECODE_KEYS), decode[kernels]
            assert decode[kernels]["tokens_per_caption"] == 64
            memory = train[kernels]["compiled_bytes_per_device"]
            assert memory is None or memory["temp"] >= 0
        assert _positive(train["xla_over_cpu_examples_per_s"])
        assert _positive(decode["xla_over_cpu_tokens_per_s"])
    assert all(math.isfinite(x) and x >= 0 for x in _numbers(out))
    seed = out["reference"]["seed_run"]
    assert (seed["step_s"], seed["batch"], seed["chips"]) == (0.45, 8192, 256)
    assert out["reference"]["maxtext_v5e_dense_llm_mfu"] == [0.55, 0.67]
