"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, a progress line.

Only process 0 writes files; every process may call these functions.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl and writes TensorBoard events through clu."""

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.is_writer:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        from clu import metric_writers  # Heavy import (TensorBoard); only the writing process pays.

        self._tb = metric_writers.create_default_writer(
            os.path.join(workdir, "tb"), asynchronous=False
        )

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop rows logged after the restored checkpoint: they are about to be redone."""
        if not os.path.exists(self.path):
            return
        if step is None:
            step = -1
        with open(self.path) as f:
            rows = [line for line in f if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        if len(kept) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        row = {"step": int(step)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        if self.is_writer:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")
            scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            self._tb.write_scalars(int(step), scalars)
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_values(rows: Sequence[dict], first_step: int = 1) -> dict[str, Any]:
    """Per key, the last value logged at a step >= `first_step` (step 0 holds `eval_at_start`'s
    numbers, or the only ones of a `total_steps=0` run)."""
    last: dict[str, Any] = {}
    for row in rows:
        if row["step"] >= first_step:
            last.update({k: v for k, v in row.items() if k != "step"})
    return last


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps/s, examples/s and ETA since the previous report.

    Speed is train-step speed: the first (compiling) step and the time `exclude`d (evaluators,
    checkpoints) are left out, so `perf/mfu` after an evaluation is not diluted by it. The ETA adds
    that excluded time back, spread over the steps run so far. `input_wait_frac` is the share of the
    same train time spent waiting for the next batch.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.reset(start_step)

    def reset(self, step: int) -> None:
        """Call after the first (compiling) step so compile time does not count as speed."""
        self._last_step, self._last_time = step, time.perf_counter()
        self._first_step, self._excluded, self._overhead, self._waited = step, 0.0, 0.0, 0.0

    def input_wait(self, seconds: float) -> None:
        """`seconds` of the current window went to waiting for the input pipeline."""
        self._waited += seconds

    def exclude(self, seconds: float) -> None:
        """`seconds` of the current window went to work other than the train step."""
        self._excluded += seconds
        self._overhead += seconds

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._last_time - self._excluded, 1e-9)
        steps = step - self._last_step
        waited = self._waited
        self._last_step, self._last_time, self._excluded, self._waited = step, now, 0.0, 0.0
        if steps <= 0:
            return {}
        sps = steps / dt
        overhead_per_step = self._overhead / max(step - self._first_step, 1)
        return {
            "steps_per_sec": sps,
            "examples_per_sec": sps * self.batch_size,
            "eta_sec": (self.total_steps - step) * (1 / sps + overhead_per_step),
            "input_wait_frac": waited / dt,
        }

    def line(self, step: int, speed: Mapping[str, float], metrics: Mapping[str, Any]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        if speed:
            parts += [
                f"{speed['steps_per_sec']:.2f} steps/s",
                f"{speed['examples_per_sec']:.0f} ex/s",
                f"ETA {_fmt_time(speed['eta_sec'])}",
            ]
        for k in ("train/loss", "lr"):
            if k in metrics:
                parts.append(f"{k.split('/')[-1]} {_scalar(metrics[k]):.4g}")
        return "  ".join(parts)


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
