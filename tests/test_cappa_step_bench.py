"""benchmarks/cappa_step.py: the verdict on the S/16 target from the children's results."""

from __future__ import annotations

import importlib.util
import os

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
