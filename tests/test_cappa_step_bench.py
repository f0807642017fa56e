"""benchmarks/cappa_step.py: the verdict on the S/16 target from the children's results."""

from __future__ import annotations

import collections
import importlib.util
import os
import types

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cappa_step.py")
_spec = importlib.util.spec_from_file_location("cappa_step", _PATH)
cappa_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cappa_step)


def _child(s16_mfu: float, s16_time: float, tiny_time: float) -> dict:
    return {
        "models": {
            "s16": {"mfu_vs_matmul_peak": s16_mfu, "step_time_s": s16_time},
            "tiny": {"mfu_vs_matmul_peak": 0.3, "step_time_s": tiny_time},
        }
    }


def test_verdict_passes_at_the_target_and_gives_8_over_1_device_times():
    target = cappa_step.TARGET_S16_MFU_OVER_PEAK
    verdict = cappa_step._verdict(
        {"1dev": _child(target, 3.0, 0.2), "8dev": _child(target - 0.01, 3.6, 0.3)}
    )
    assert verdict["mfu_s16"] == {"1dev": target, "8dev": target - 0.01}
    assert verdict["pass"] == {"1dev": True, "8dev": False}
    assert verdict["time_8dev_over_1dev"] == {"s16": 1.2, "tiny": 1.5}


def test_timed_rounds_warms_each_model_up_before_timing_it_and_flips_the_order():
    calls = []

    def runner(name: str):
        def run(steps: int) -> float:
            calls.append((name, steps))
            return {"a": 1.0, "b": 2.0}[name] * (10 if steps == 1 else 1)  # warm-ups are slow

        return run

    peaks = iter([100.0, 200.0, 300.0])
    calls_peak = lambda: calls.append(("peak", 0)) or next(peaks)  # noqa: E731
    times, kernel = cappa_step.timed_rounds(
        {"a": runner("a"), "b": runner("b")}, calls_peak, rounds=3, steps=2
    )
    round_0 = [("peak", 0), ("b", 1), ("b", 2), ("a", 1), ("a", 2)]
    round_1 = [("peak", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert calls == round_0 + round_1 + round_0
    # Timed entries hold only the timed runs; the slow warm-ups are kept apart.
    assert times == {
        "peak": [100.0, 200.0, 300.0],
        "a": [1.0] * 3,
        "a_warmup": [10.0] * 3,
        "b": [2.0] * 3,
        "b_warmup": [20.0] * 3,
    }
    assert set(kernel) == {"a", "b"} and all(k["sys_s"] >= 0 for k in kernel.values())


def test_model_summary_pairs_rounds_for_mfu_and_also_gives_medians():
    step = types.SimpleNamespace(gflops=600.0, gflops_per_device=75.0, batch_size=16)
    times = {"peak": [300.0, 400.0, 200.0], "s16": [4.0, 3.0, 5.0], "s16_warmup": [4.1, 5.2, 4.9]}
    kernel = collections.Counter(sys_s=3.0, minor_faults=6000)
    out = cappa_step.model_summary("s16", times, kernel, step, n_steps=6)
    # Per round: 600 / (4 * 300) = 0.5, 600 / (3 * 400) = 0.5, 600 / (5 * 200) = 0.6.
    assert out["mfu_per_round"] == [0.5, 0.5, 0.6]
    assert out["mfu_vs_matmul_peak"] == 0.5
    assert out["mfu_median_step_over_median_peak"] == 0.5  # 600 / (4 * 300)
    assert out["step_time_s"] == 4.0 and out["step_time_s_range"] == [3.0, 5.0]
    assert out["examples_per_s"] == 4.0
    assert out["warmup_step_s_per_round"] == [4.1, 5.2, 4.9]
    assert (out["sys_s_per_step"], out["minor_faults_per_step"]) == (0.5, 1000)
