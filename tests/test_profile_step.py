"""benchmarks/profile_step.py: op kinds, matmul FLOPs and wall shares of a hand-written trace."""

from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_step.py")
_spec = importlib.util.spec_from_file_location("profile_step", _PATH)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)

# A library matmul fusion [4,8] @ [8,16], an all-reduce, and a loop fusion from block 3's MLP.
HLO = """
%fused_computation.1 (param_0: f32[4,8], param_1: f32[8,16]) -> f32[4,16] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[4,16]) -> f32[4,16] {
  %param_0.1 = f32[4,16]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,16]{1,0} tanh(%param_0.1)
}

ENTRY %main (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,16]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1
  %all-reduce.1 = f32[4,16]{1,0} all-reduce(%ynn_fusion.1), to_apply=%add
  ROOT %tanh_fusion = f32[4,16]{1,0} fusion(%all-reduce.1), kind=kLoop, calls=%fused_computation.2, META
}
""".replace("META", 'metadata={op_name="jit(step_fn)/Model/block_3/mlp/tanh"}')

# (thread, op, start, duration) in ns, MS = 1 ms: the matmul alone for 500 ms, then with the loop fusion
# for 500, the loop fusion alone for 500, then the collective for 100. Other names (runtime events) are ignored.
MS = 1_000_000
EVENTS = [
    ("t0", "ynn_fusion.1", 0, 1000 * MS),
    ("t1", "tanh_fusion", 500 * MS, 1000 * MS),
    ("t0", "all-reduce.1", 1500 * MS, 100 * MS),
    ("t0", "ThunkExecutor::Execute", 0, 1600 * MS),
    ("t0", "Rendezvous", 1500 * MS, 60 * MS),  # waits: t0 60 ms + 20 ms, t1 40 ms
    ("t0", "Rendezvous", 1600 * MS, 20 * MS),
    ("t1", "Rendezvous", 1500 * MS, 40 * MS),
]


def test_summary_of_a_known_trace():
    out = profile_step.summarise(EVENTS, HLO, step_s=1.6, top=5)
    assert out["op_time_s"] == {"matmul fusion": 1.0, "loop fusion": 1.0, "collective": 0.1}
    # Wall: the overlapping 500 ns are shared half and half.
    assert out["wall_s"] == pytest.approx(
        {"matmul fusion": 0.75, "loop fusion": 0.75, "collective": 0.1}
    )
    assert out["ops_running_at_once_s"]["1"] == pytest.approx(1.1)
    assert out["rendezvous_s_per_thread"] == pytest.approx((0.08 + 0.04) / 2)
    assert out["ops_running_at_once_s"]["2"] == pytest.approx(0.5)
    (matmul,) = out["matmuls"]
    assert matmul["count"] == 1
    assert matmul["gflop"] == round(2 * 4 * 8 * 16 / 1e9, 2)
    assert matmul["time_s"] == 1.0 and matmul["gflops_per_s"] == round(2 * 4 * 8 * 16 / 1e9, 1)
    assert matmul["shapes"] == "f32[4,16]{1,0} <- f32[4,8]{1,0}, f32[8,16]{1,0}"
    assert out["loop_fusions"] == [{"op": "Model/block_N/mlp/tanh", "time_s": 1.0}]


def test_time_in_which_only_collectives_run_counts_as_no_compute():
    events = [
        ("t0", "ynn_fusion.1", 0, 100 * MS),
        ("t0", "all-reduce.1", 100 * MS, 200 * MS),  # every thread waits: nothing computes
        ("t1", "tanh_fusion", 300 * MS, 100 * MS),
    ]
    out = profile_step.summarise(events, HLO, step_s=0.4, top=5)
    assert out["compute_ops_running_at_once_s"] == pytest.approx({"0": 0.2, "1": 0.2})
    assert out["ops_running_at_once_s"] == pytest.approx({"0": 0.0, "1": 0.4})
