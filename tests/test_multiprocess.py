"""Two CPU processes, one device each, joined with jax.distributed: the multi-host code path of the loop.

Each process reads its own slice of the data, only process 0 writes files, checkpoints hold both hosts' input
positions, and a run stopped and resumed equals an uninterrupted one.
"""

import json
import os
import re
import shutil
import socket
import subprocess

import numpy as np
from helpers import ROOT, cli, final_params

from transfer import metrics

CONSTANT_LR = {"decay_type": "constant", "warmup_steps": 2}  # Independent of total_steps.
TINY_EVALS = {"val": {"data": {"split": "validation"}, "batch_size": 16}}  # As in tiny_config.py.


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir, data_dir, total_steps):
    port = _free_port()
    # One device per process; the suite's other XLA flags (conftest) are kept.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            cli(
                workdir,
                data_dir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                total_steps=total_steps,
                ckpt_steps=4,
                schedule=CONSTANT_LR,
                evals=TINY_EVALS,
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_processes_resume_equals_uninterrupted(data_dir, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    _run_two_processes(straight, data_dir, total_steps=8)
    # The run as it was when stopped right after its step-4 checkpoint (what SIGTERM leaves behind; the
    # single-process resume tests kill real runs): step 8's checkpoint gone, rows after 4 still there.
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    outs = _run_two_processes(resumed, data_dir, total_steps=8)
    assert all("Resumed from step 4" not in out for out in outs[1:])  # Only process 0 prints.
    assert "Resumed from step 4" in outs[0]

    rows = metrics.read_jsonl(os.path.join(straight, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))  # One writer: no duplicated rows.
    resumed_rows = metrics.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["train/loss"] for r in resumed_rows] == [r["train/loss"] for r in rows]
    assert rows[-1]["val/prec@1"] == resumed_rows[-1]["val/prec@1"]

    with open(os.path.join(straight, "checkpoints", "8", "input", "metadata")) as f:
        saved = json.load(f)
    local_batch = 16 // 2
    assert saved["positions"] == [8 * local_batch, 8 * local_batch] and saved["skipped"] == [0, 0]

    _, params = final_params(straight)
    _, resumed_params = final_params(resumed)
    for path, x in params.items():
        np.testing.assert_array_equal(resumed_params[path], x, err_msg=path)
