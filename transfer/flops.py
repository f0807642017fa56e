"""FLOPs per example and model FLOPs utilisation (MFU) of the train step, for the `perf/` metrics.

FLOPs come from XLA's cost analysis of the *lowered* step (the whole program before SPMD partitioning, so they are the
global work of one step, not one device's share). XLA counts the body of a loop once, whatever its trip count, so a
step that scans over micro-batches under-reports its work: the loop measures a copy of the step built without
micro-batches (`accum_steps=1`), which does the same work per example. Rematerialised forward passes are counted, as
XLA sees them: with `jax.checkpoint` the number is closer to hardware FLOPs than to model FLOPs.

MFU = achieved FLOP/s / (peak FLOP/s per device * devices). The peak is `config.peak_flops_per_device` when set,
else a table of dense bf16 peaks by `device.device_kind`, else (CPU, unknown kinds) a measured float32 matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

GiB = 2**30

# One JAX device of each kind: dense (no sparsity) bf16 peak FLOP/s and memory (HBM) in bytes, matched in
# order against the lowercased `device_kind`. The loop's MFU reads the peak; `cappa info --device` (the memory
# and time planner, pretrain/plan.py) reads both. TPU v2/v3 expose each of a chip's two cores as a device: half
# the chip's peak and memory. From v4 on, one device is one chip (megacore). V100 and T4 have no bf16: their fp16
# tensor-core peak is used. Memory is the vendor's nominal capacity read as GiB (the runtime keeps a little of
# it for itself, which the planner's headroom is for); where a kind comes in two sizes the smaller one is the
# default and the larger is matched by name (A100 40 vs 80 GB).
PEAK_TABLE: tuple[tuple[str, float, int], ...] = (
    (r"tpu v2", 45e12 / 2, 8 * GiB),
    (r"tpu v3", 123e12 / 2, 16 * GiB),
    (r"tpu v4 ?lite|tpu v4i", 138e12, 8 * GiB),
    (r"tpu v4", 275e12, 32 * GiB),
    (r"tpu v5 ?lite|tpu v5e", 197e12, 16 * GiB),
    (r"tpu v5p?", 459e12, 95 * GiB),
    (r"tpu v6 ?lite|tpu v6e|trillium", 918e12, 32 * GiB),
    (r".*\bb200\b.*", 2250e12, 180 * GiB),
    (r".*\bgh200\b.*", 989e12, 96 * GiB),
    (r".*\bh200\b.*", 989e12, 141 * GiB),
    (r".*\bh100\b.*pcie.*", 756e12, 80 * GiB),
    (r".*\bh100\b.*nvl.*", 835e12, 94 * GiB),
    (r".*\bh100\b.*", 989e12, 80 * GiB),  # SXM.
    (r".*\bh800\b.*", 989e12, 80 * GiB),
    (r".*\ba100\b.*80 ?gb.*", 312e12, 80 * GiB),
    (r".*\ba100\b.*", 312e12, 40 * GiB),
    (r".*\ba800\b.*", 312e12, 80 * GiB),
    (r".*\bl40s\b.*", 362e12, 48 * GiB),
    (r".*\bl4\b.*", 121e12, 24 * GiB),
    # A10G: the A10 datasheet value; the cloud variant may clock lower.
    (r".*\ba10g\b.*", 125e12, 24 * GiB),
    (r".*\ba10\b.*", 125e12, 24 * GiB),
    (r".*\ba40\b.*", 150e12, 48 * GiB),
    (r".*\bv100\b.*pcie.*", 112e12, 16 * GiB),
    (r".*\bv100\b.*32 ?gb.*", 125e12, 32 * GiB),
    (r".*\bv100\b.*", 125e12, 16 * GiB),  # SXM2/SXM3, fp16.
    (r".*\bt4\b.*", 65e12, 16 * GiB),  # fp16.
)


def step_flops(compiled_or_lowered: Any) -> float | None:
    """FLOPs of one call of a `jax.jit(f).lower(...)` (global) or `.compile()` (per device) object.

    None when the backend offers no cost analysis. Loop bodies count once (see the module docstring).
    """
    try:
        analysis = compiled_or_lowered.cost_analysis()
    except Exception:  # Some backends/plugins do not implement it: FLOPs are then simply unknown.
        return None
    if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, Mapping):
        return None
    flops = analysis.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def table_entry(device_kind: str) -> tuple[float, int] | None:
    """(dense bf16 peak FLOP/s, memory bytes) of one device of a `device_kind`, or None for kinds the
    table does not know. Short names work too: "v5e" is "tpu v5e", "h100" an H100 SXM."""
    kind = device_kind.strip().lower()
    if re.fullmatch(r"v\d(\D.*)?", kind):  # "v5e", "v4", not "v100"
        kind = "tpu " + kind
    for pattern, peak, memory in PEAK_TABLE:
        if re.fullmatch(pattern, kind):
            return peak, memory
    return None


def table_peak(device_kind: str) -> float | None:
    """The table's dense bf16 peak for a `device_kind`, or None for kinds it does not know."""
    entry = table_entry(device_kind)
    return None if entry is None else entry[0]


@functools.cache
def measure_matmul_flops(platform: str, device_kind: str, size: int = 1024, reps: int = 5) -> float:
    """Best FLOP/s of a jitted float32 `size`^2 matmul on the first device of that kind (cached per process).

    A device without a table entry (CPU) is judged by what it achieves on the most favourable dense op.
    """
    local = jax.local_devices()
    same = [d for d in local if d.platform == platform and d.device_kind == device_kind]
    device = (same or local)[0]
    with jax.set_mesh(None):  # One device, whatever mesh the caller has in context.
        a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size)), device)
        matmul = jax.jit(jnp.matmul)
        matmul(a, a).block_until_ready()  # Compile.
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / max(best, 1e-9)


def peak_flops_per_device(device: Any, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from: "config", "table: <kind>" or "measured: ...")."""
    if override is not None:
        if not override > 0:
            raise ValueError(
                f"config.peak_flops_per_device = {override!r} must be a positive FLOP/s "
                "number (e.g. 197e12), or None to use the table / a measurement."
            )
        return float(override), "config"
    peak = table_peak(device.device_kind)
    if peak is not None:
        return peak, f"table: {device.device_kind}"
    measured = measure_matmul_flops(device.platform, device.device_kind)
    return measured, f"measured: float32 1024^2 matmul on {device.platform} ({device.device_kind})"


@dataclasses.dataclass(frozen=True)
class Perf:
    """What the loop needs to turn a speed measurement into `perf/` metrics; built once per run."""

    flops_per_example: float | None
    peak_per_device: float
    peak_source: str
    num_devices: int

    def describe(self) -> str:
        fpe = "unknown" if self.flops_per_example is None else f"{self.flops_per_example:.4g}"
        return (
            f"FLOPs per example {fpe}; peak {self.peak_per_device / 1e12:.4g} TFLOP/s per device "
            f"({self.peak_source}) x {self.num_devices} devices."
        )

    def row(self, speed: Mapping[str, float]) -> dict[str, float]:
        """`perf/flops_per_example` always, `perf/mfu` when `speed` has `examples_per_sec`."""
        if self.flops_per_example is None:
            return {}
        out = {"perf/flops_per_example": self.flops_per_example}
        if "examples_per_sec" in speed:
            achieved = self.flops_per_example * speed["examples_per_sec"]
            out["perf/mfu"] = achieved / (self.peak_per_device * self.num_devices)
        return out


def measure_step(
    cost_fn: Any,
    args: tuple,
    global_batch: int,
    mesh: jax.sharding.Mesh,
    override: float | None,
    per_example: Callable[[], float | None] | None = None,
) -> Perf:
    """Lowers the jitted `cost_fn(*args)` (no compilation) and looks up the peak of the mesh's devices.

    `cost_fn` is the train step without micro-batches; lowering the step the loop calls shares its trace.
    A task that counts its own model FLOPs passes `per_example`, and the step is not lowered at all.
    """
    if per_example is not None:
        flops_per_example = per_example()
    else:
        total = step_flops(cost_fn.lower(*args))
        flops_per_example = None if total is None else total / global_batch
    peak, source = peak_flops_per_device(mesh.devices.flat[0], override)
    return Perf(flops_per_example, peak, source, int(mesh.devices.size))
