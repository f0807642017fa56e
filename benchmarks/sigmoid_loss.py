"""Sigmoid loss + gradient vs global batch: the chunked ring and all-gather losses on 8 (fake CPU) devices against
the naive dense loss (the full N x N logits on one device, or left to XLA's partitioner on the 8 devices); prints one
JSON object.

    .venv/bin/python benchmarks/sigmoid_loss.py [--quick] [--dim 128] [--batches 256,1024,4096,8192]

Memory is XLA's own account of each compiled executable, per device (`compiled.memory_analysis()`): `temp` is the
scratch the program needs on top of its arguments and outputs, `peak` = arguments + outputs + temp (aliased bytes
not counted twice). That is what grows with the batch and what would run out on an accelerator; process RSS on a
CPU host shared by 8 fake devices says nothing per device. Times are wall-clock medians of jitted loss + gradient
(w.r.t. img, txt, t, b) after compilation; 8 fake devices share this host's cores, so the chunked variants' times
show overheads, not the speed-up of real parallel devices. Embeddings are random unit vectors, float32.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from statistics import median  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfer import sharding  # noqa: E402
from transfer import sigmoid_loss as sl  # noqa: E402

# dense_spmd: the naive loss code on the sharded batch, partitioned by XLA as it sees fit (what writing
# `img @ txt.T` in a task gives inside the loop's mesh).
VARIANTS = ("ring", "allgather", "dense_spmd", "dense")


def _inputs(n: int, dim: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2, n, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    return img, txt, np.float32(np.log(10.0)), np.float32(-10.0)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"temp_mib": m.temp_size_in_bytes / 2**20, "peak_mib": peak / 2**20}


def bench(variant: str, n: int, dim: int, repeats: int) -> dict:
    """Compile loss + gradient ahead of time, read its memory analysis, then time `repeats` calls."""
    mode = "dense" if variant.startswith("dense") else variant
    fn = jax.jit(
        jax.value_and_grad(
            lambda i, x, t, b: sl.chunked_sigmoid_loss(i, x, t, b, mode=mode),
            argnums=(0, 1, 2, 3),
        )
    )
    img, txt, t, b = _inputs(n, dim)
    if variant == "dense":  # Naive: one device, no mesh, the whole [N, N] logits.
        devices = 1
        args = jax.device_put((img, txt, t, b), jax.devices()[0])
        compiled = fn.lower(*args).compile()
    else:
        mesh = sharding.make_mesh([("data", -1)])
        devices = mesh.size
        batch = NamedSharding(mesh, P(("data",)))
        args = (jax.device_put(img, batch), jax.device_put(txt, batch), t, b)
        with jax.set_mesh(mesh):  # As the train loop runs the step.
            compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, _ = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "global_batch": n,
        "devices": devices,
        "local_batch": n // devices,
        "dim": dim,
        "loss": float(loss),
        "time_ms": round(1e3 * median(times), 2),
        **{k: round(v, 3) for k, v in _memory(compiled).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="global batches 256 and 1024 only")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--batches", default="256,1024,4096,8192", help="global batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batches.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 1024]
    results = [bench(v, n, args.dim, args.repeats) for n in sizes for v in VARIANTS]
    # The variants compute the same loss: say so, so a wrong number is never mistaken for a fast one.
    for n in sizes:
        losses = [r["loss"] for r in results if r["global_batch"] == n]
        if max(losses) - min(losses) > 1e-4 * abs(max(losses)):
            raise SystemExit(f"Variants disagree at N = {n}: losses {losses}.")
    print(
        json.dumps(
            {
                "benchmark": "sigmoid_loss",
                "date": datetime.date.today().isoformat(),
                "devices": jax.device_count(),
                "platform": jax.devices()[0].platform,
                "cpu_count": os.cpu_count(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
