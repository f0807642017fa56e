"""Where the CapPa train step's time goes on XLA:CPU: one traced step, op time by kind; prints one JSON object.

    .venv/bin/python benchmarks/profile_step.py [--model s16|tiny] [--devices 1] [--malloc default]
        [--top 15] [--trace_dir DIR]

Why: the MFU of `cappa_step.py` says how far the step is from the matmul peak, not why. This script runs
the same engine step (`cappa_step.EngineStep`) once under `jax.profiler.trace` with XLA:CPU's per-op
trace events on (`--xla_cpu_enable_xprof_traceme`, which must be set before JAX starts: the work runs
in a child process, as in `cappa_step.py`), maps every event to its instruction in the compiled HLO and
reports:

* `op_time_s`: summed op durations by kind (matmul fusions, other library fusions, XLA loop fusions,
  collectives). Ops that run at the same time on different threads both count.
* `wall_s`: the step's wall time shared out among the ops running at each instant, by the same kinds,
  and how long 0, 1, 2, ... ops ran at once (one thread each, or a library op using the pool);
  `compute_ops_running_at_once_s` counts the same without collectives.
* `matmuls`: the matmul fusions grouped by operand and result shapes, with achieved GFLOP/s; compare
  with `cappa_step.py`'s matmul peak to find the shapes and layouts that run slowly.
* `loop_fusions`: the XLA loop fusions grouped by the model op they come from (block index removed).
* `rendezvous_s_per_thread`: time each device thread waits for the others at collectives.
* `kernel`: the step's sys time and page faults, which no op event shows (`child_env.py`: the
  temporary buffer re-faulted every step was found this way; `--malloc hugepages` is the fix).

This is how the attention backward (`pretrain/linear.attention`) and the residual-gradient barrier were
found. Timings are one step on a noisy machine: read the shares, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from child_env import MALLOC, child_env  # noqa: E402

_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Compiled HLO text -> ({instruction: (opcode or fusion kind, op_name, called computation)},
    {computation: its instruction lines})."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = computations.setdefault(head.group(1), [])
            continue
        if current is not None:
            current.append(line)
        m = _INSTR.match(line)
        if not m:
            continue
        kind = m.group(3)
        if kind == "fusion":
            fusion_kind = re.search(r"kind=(\w+)", line)
            kind = "fusion:" + (fusion_kind.group(1) if fusion_kind else "?")
        op_name = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        instructions[m.group(1)] = (
            kind,
            op_name.group(1) if op_name else "",
            called.group(1) if called else None,
        )
    return instructions, computations


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def matmul_in(lines: list[str]) -> tuple[float, str]:
    """(FLOPs, 'result <- lhs, rhs' shapes) of the dots in a fused computation; (0, '') if none."""
    shapes, flops, described = {}, 0.0, []
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        shapes[m.group(1)] = m.group(2)
        if m.group(3) != "dot":
            continue
        operands = re.findall(r"%([\w.\-]+)", m.group(4).split(")")[0])
        lhs = _dims(shapes.get(operands[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        k = 1
        for d in contracting.group(1).split(",") if contracting else []:
            k *= lhs[int(d)] if d else 1
        out = 1
        for d in _dims(m.group(2)):
            out *= d
        flops += 2.0 * k * out
        described.append(f"{m.group(2)} <- {', '.join(shapes.get(o, '?') for o in operands[:2])}")
    return flops, "; ".join(described)


def classify(name: str, instructions: dict, computations: dict) -> str:
    kind, _, called = instructions[name]
    if kind == "fusion:kCustom":
        flops, _ = matmul_in(computations.get(called, []))
        return "matmul fusion" if flops else "library fusion (no matmul)"
    if kind.startswith("fusion:"):
        return "loop fusion"
    if kind in _COLLECTIVES:
        return "collective"
    return kind


def summarise(events: list, hlo_text: str, step_s: float, top: int) -> dict:
    """events: (thread, name, start_ns, duration_ns) of the XLA worker threads."""
    instructions, computations = parse_hlo(hlo_text)
    ops = [e for e in events if e[1] in instructions]
    op_time, matmuls, loops = collections.Counter(), {}, collections.Counter()
    for _, name, _, dur in ops:
        kind = classify(name, instructions, computations)
        op_time[kind] += dur
        if kind == "matmul fusion":
            flops, shapes = matmul_in(computations[instructions[name][2]])
            row = matmuls.setdefault(shapes, [0, 0.0, 0])
            row[0], row[1], row[2] = row[0] + dur, row[1] + flops, row[2] + 1
        elif kind == "loop fusion":
            op_name = instructions[name][1].replace("jit(step_fn)/", "")
            loops[re.sub(r"block_\d+", "block_N", op_name)] += dur
    wall, concurrency = _wall_shares(ops, instructions, computations)
    compute = [e for e in ops if classify(e[1], instructions, computations) != "collective"]
    _, compute_concurrency = _wall_shares(compute, instructions, computations)
    waits = collections.Counter()
    for thread, name, _, dur in events:
        if name == "Rendezvous":
            waits[thread] += dur
    return {
        "step_s": round(step_s, 4),
        "op_time_s": {k: round(v / 1e9, 4) for k, v in op_time.most_common()},
        "wall_s": {k: round(v / 1e9, 4) for k, v in wall.most_common()},
        # Threads waiting for each other at collectives. Combined (tuple) all-reduces have no op
        # event of their own in XLA:CPU's trace: their time shows only here and as 0 ops running.
        "rendezvous_s_per_thread": round(sum(waits.values()) / max(len(waits), 1) / 1e9, 4),
        "ops_running_at_once_s": {
            str(k): round(v / 1e9, 4) for k, v in sorted(concurrency.items())
        },
        # The same without collectives: "0" is time in which no thread computes (all wait).
        "compute_ops_running_at_once_s": {
            str(k): round(v / 1e9, 4) for k, v in sorted(compute_concurrency.items())
        },
        "matmuls": [
            {
                "shapes": shapes,
                "count": n,
                "time_s": round(t / 1e9, 4),
                "gflop": round(f / 1e9, 2),
                "gflops_per_s": round(f / t, 1),
            }
            for shapes, (t, f, n) in sorted(matmuls.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "loop_fusions": [
            {"op": op, "time_s": round(t / 1e9, 4)} for op, t in loops.most_common(top)
        ],
    }


def _wall_shares(ops: list, instructions: dict, computations: dict):
    """Shares the wall time among the ops running at each instant; also time per number running."""
    points = []
    for _, name, start, dur in ops:
        points += [(start, 1, name), (start + dur, -1, name)]
    points.sort(key=lambda p: (p[0], p[1]))
    running, wall, concurrency = collections.Counter(), collections.Counter(), collections.Counter()
    kinds = {}
    last = points[0][0] if points else 0
    for t, delta, name in points:
        total = sum(running.values())
        concurrency[total] += t - last
        for other, count in running.items():
            if other not in kinds:
                kinds[other] = classify(other, instructions, computations)
            wall[kinds[other]] += (t - last) * count / total
        running[name] += delta
        if running[name] <= 0:
            del running[name]
        last = t
    return wall, concurrency


def child(model: str, top: int, trace_dir: str) -> dict:
    import cappa_step
    import jax

    step = cappa_step.EngineStep(model)
    step.run(1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    with jax.profiler.trace(trace_dir):
        step_s = step.run(1)
    after = resource.getrusage(resource.RUSAGE_SELF)
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"profile_step: jax.profiler.trace wrote no *.xplane.pb under {trace_dir}")
    events = [
        (line.name, ev.name, ev.start_ns, ev.duration_ns)
        for plane in jax.profiler.ProfileData.from_file(paths[0]).planes
        for line in plane.lines
        if "XLAEigen" in line.name
        for ev in line.events
    ]
    if not events:
        raise SystemExit(
            "profile_step: the trace has no XLA:CPU op events; this jaxlib may not honour "
            "--xla_cpu_enable_xprof_traceme (needs the CPU backend, flag set before JAX starts)"
        )
    out = summarise(events, step.step_fn.as_text(), step_s, top)
    out["model"], out["devices"] = model, jax.device_count()
    out["kernel"] = {  # includes the tracer's own work
        "sys_s": round(after.ru_stime - before.ru_stime, 3),
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }
    out["model_gflop_per_step"] = round(step.gflops, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="s16", choices=["s16", "tiny"])
    parser.add_argument(
        "--devices", type=int, default=1, help="fake CPU devices (1 or 8 as cappa_step)"
    )
    parser.add_argument(
        "--malloc", default="default", choices=list(MALLOC), help="C library malloc setting"
    )
    parser.add_argument("--top", type=int, default=15, help="rows of the matmul and loop tables")
    parser.add_argument(
        "--trace_dir", default=None, help="keep the trace here (TensorBoard profile)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="cappa-profile-")
    if args.child:
        print(json.dumps(child(args.model, args.top, trace_dir)), flush=True)
        return
    env = child_env(args.devices, args.malloc, ("--xla_cpu_enable_xprof_traceme=true",))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", args.model]
    cmd += ["--top", str(args.top), "--trace_dir", trace_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        sys.exit(f"profile child failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out["trace_dir"] = args.trace_dir
    if not args.trace_dir:
        shutil.rmtree(trace_dir, ignore_errors=True)
    print(json.dumps(out, indent=2), flush=True)


if __name__ == "__main__":
    main()
