"""FLOP accounting against analytic counts, the peak table, MFU in metrics.jsonl, and batch annotations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transfer import flops, metrics, sharding, train
from transfer.config import apply_overrides

M, K, N = 64, 128, 32


def _operands():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(M, K)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(K, N)), jnp.float32)
    return x, w


def test_matmul_flops_are_exactly_2mnk():
    lowered = jax.jit(jnp.matmul).lower(*_operands())
    assert flops.step_flops(lowered) == 2 * M * N * K
    assert flops.step_flops(lowered.compile()) == 2 * M * N * K  # One device: the same program.


def test_dense_forward_and_backward_is_three_matmuls():
    """y = x @ w; the gradients w.r.t. x and w are one matmul each: 6*M*N*K plus a few elementwise ops."""
    t = jnp.ones((M, N))

    def loss(x, w):
        return jnp.sum((x @ w) * t)

    value = flops.step_flops(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*_operands()))
    assert 6 * M * N * K <= value <= 1.02 * 6 * M * N * K


def test_xla_counts_a_loop_body_once():
    """Why the loop lowers a step without micro-batches: a scan of 4 matmuls is reported as one.

    If a future XLA counts trip counts, this fails: the `cost_fn` detour in train.setup is then unneeded.
    """
    x, w = _operands()

    def scanned(xs, w):
        return jax.lax.scan(lambda c, xi: (c + xi @ w, None), jnp.zeros((M // 4, N)), xs)[0]

    value = flops.step_flops(jax.jit(scanned).lower(x.reshape(4, M // 4, K), w))
    assert value < 0.5 * 2 * M * N * K


def test_step_flops_without_cost_analysis_is_none():
    class NoAnalysis:
        def cost_analysis(self):
            raise NotImplementedError

    class ListAnalysis:
        def cost_analysis(self):
            return [{"flops": 12.0}]

    assert flops.step_flops(NoAnalysis()) is None
    assert flops.step_flops(ListAnalysis()) == 12.0


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v2", 22.5e12),  # Per core: a v2 chip (45e12) is two devices.
        ("TPU v3", 61.5e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 125e12),
        ("Tesla V100-SXM2-16GB", 125e12),
        ("NVIDIA L40", None),  # Not "L4": unknown kinds are measured, never guessed.
        ("cpu", None),
    ],
)
def test_peak_table(kind, peak):
    assert flops.table_peak(kind) == peak


def test_cpu_peak_is_measured_once_and_override_wins():
    device = jax.devices()[0]
    peak, source = flops.peak_flops_per_device(device)
    assert source.startswith("measured") and 1e8 < peak < 1e14
    assert flops.peak_flops_per_device(device) == (peak, source)  # Cached: the very same number.
    assert flops.peak_flops_per_device(device, 5e12) == (5e12, "config")
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        flops.peak_flops_per_device(device, 0.0)


def test_perf_row_is_achieved_over_peak_times_devices():
    perf = flops.Perf(flops_per_example=100.0, peak_per_device=10.0, peak_source="t", num_devices=2)
    assert perf.row({"examples_per_sec": 4.0}) == {
        "perf/flops_per_example": 100.0,
        "perf/mfu": 100.0 * 4.0 / (10.0 * 2),
    }
    assert perf.row({}) == {"perf/flops_per_example": 100.0}  # The compiling step has no speed.
    assert flops.Perf(None, 10.0, "t", 2).row({"examples_per_sec": 4.0}) == {}


def _spec0(array):
    spec = array.sharding.spec if isinstance(array.sharding, NamedSharding) else PartitionSpec()
    axis = spec[0] if len(spec) else None
    return (axis,) if isinstance(axis, str) else tuple(axis or ())


def test_constrain_batch_splits_dim0_under_a_mesh_only():
    f = jax.jit(lambda x: sharding.constrain_batch(x * 2.0))
    x = jnp.arange(48.0).reshape(16, 3)
    plain = f(x)  # No mesh in context: identity.
    assert plain.sharding.is_fully_replicated
    assert sharding.constrain_batch(x) is x
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "model"))
    with jax.set_mesh(mesh):
        out = f(jax.device_put(x, NamedSharding(mesh, PartitionSpec())))
        assert _spec0(out) == ("data", "model")
        assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}  # 16 rows / 8.
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2.0)
        data_only = jax.jit(lambda x: sharding.constrain_batch(x + 1.0, ("data",)))(x)
        assert _spec0(data_only) == ("data",)
        odd = f(jnp.ones((6, 3)))  # 6 rows over 8 shards: left alone.
        assert odd.sharding.is_fully_replicated
        with pytest.raises(ValueError, match="not axes of the mesh"):
            sharding.constrain_batch(x, ("batch",))


def _run(config, workdir, accum_steps):
    """setup -> the step's own XLA count -> run_loop; records whether model code saw the mesh."""
    apply_overrides(
        config,
        {"total_steps": 3, "accum_steps": accum_steps, "evals": {}, "ckpt_steps": 100},
    )
    run = train.setup(config, workdir)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=run.batch_sharding)
        for k, v in run.first_batch.items()
    }
    seen = []  # The mesh size model code sees each time the step is traced.
    loss_fn = run.task.loss_fn

    def spy(*args):
        seen.append(jax.sharding.get_abstract_mesh().size)
        return loss_fn(*args)

    run.task.loss_fn = spy
    with jax.set_mesh(run.mesh):  # The loop traces under the mesh too: it reuses this trace.
        naive = flops.step_flops(run.step_fn.lower(run.state, batch))
    train.run_loop(run)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return naive, rows, seen


def test_mfu_in_metrics_and_flops_independent_of_accumulation(tiny_config, tmp_path):
    import copy

    flops.measure_matmul_flops.cache_clear()  # Measured inside the loop's mesh context.
    config_2 = copy.deepcopy(tiny_config)
    naive_1, rows_1, seen = _run(tiny_config, str(tmp_path / "a1"), 1)
    batch = tiny_config.input.batch_size
    # Traced once (the loop's FLOP count and its steps share the trace), with the mesh in context.
    assert seen == [8]
    assert [r["perf/flops_per_example"] for r in rows_1] == pytest.approx([naive_1 / batch] * 3)
    mfus = [r["perf/mfu"] for r in rows_1 if "perf/mfu" in r]
    assert len(mfus) == 2 and all(0 < m < 1.5 for m in mfus)  # Step 1 (compiling) has no speed.
    expected = naive_1 / batch * rows_1[-1]["examples_per_sec"]
    peak = expected / rows_1[-1]["perf/mfu"] / 8
    assert peak == pytest.approx(flops.peak_flops_per_device(jax.devices()[0])[0], rel=1e-6)

    naive_2, rows_2, seen = _run(config_2, str(tmp_path / "a2"), 2)
    assert len(seen) > 1 and set(seen) == {8}  # + the step without micro-batches, for its FLOPs.
    per_example_2 = rows_2[-1]["perf/flops_per_example"]
    assert per_example_2 == pytest.approx(naive_1 / batch, rel=0.05)
    assert naive_2 / batch < 0.75 * per_example_2  # What an uncorrected count would have logged.
