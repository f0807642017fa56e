"""Preemption and failure: SIGKILL/SIGTERM and resume, non-finite loss, atomic checkpoints, mismatches."""

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ROOT, TINY, cli, final_params, steps

from transfer import checkpoint, metrics, train, tree
from transfer.config import apply_overrides

LONG = {"total_steps": 24, "ckpt_steps": 8, "evals": {}}
LAST = LONG["total_steps"]


def _cli(workdir, data_dir, pause_at=None):
    """`cappa train` on the tiny config for LONG's steps."""
    return cli(workdir, data_dir, pause_at=pause_at, **LONG)


def _start_paused(workdir, data_dir, step):
    """Starts a run and returns the process once it holds still after its checkpoint at `step`."""
    proc = subprocess.Popen(
        _cli(workdir, data_dir, pause_at=step),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while step not in steps(workdir):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "run did not reach the checkpoint in time"
        time.sleep(0.01)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run, in this process: the same config and flags as the command line's runs."""
    from transfer import config as config_lib

    workdir = str(tmp_path_factory.mktemp("reference"))
    config, _ = train.prepare_config(config_lib.load_config_file(TINY))
    apply_overrides(config, {"input.data.data_dir": data_dir, **LONG})
    train.train(config, workdir)
    return workdir


def _assert_same_run(workdir, reference):
    step, params = final_params(workdir)
    ref_step, ref_params = final_params(reference)
    assert step == ref_step == LAST
    for path, x in ref_params.items():
        np.testing.assert_array_equal(params[path], x, err_msg=path)  # Bit-exact on CPU.
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    ref_rows = metrics.read_jsonl(os.path.join(reference, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # No duplicated steps.
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    assert [r["input/skipped"] for r in rows] == [r["input/skipped"] for r in ref_rows]


def test_sigterm_then_sigkill_and_resume_equals_uninterrupted(reference, data_dir, tmp_path):
    """One run preempted twice: SIGTERM while it holds still after its step-8 checkpoint (it saves step 9
    and exits 143), then, resumed, SIGKILL after its step-16 checkpoint (nothing more is saved). Resumed
    again, it ends bit-identical to the uninterrupted run."""
    workdir = str(tmp_path)
    proc = _start_paused(workdir, data_dir, 8)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Stopped by SIGTERM at step 9;" in stderr
    assert steps(workdir) == [8, 9]

    proc = _start_paused(workdir, data_dir, 16)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert steps(workdir) == [8, 9, 16]

    done = subprocess.run(_cli(workdir, data_dir), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from step 16" in done.stdout
    _assert_same_run(workdir, reference)


def test_half_written_checkpoint_is_never_loaded(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    # What a run killed in the middle of saving step 100 leaves behind: a temporary directory,
    # here with its array data truncated.
    partial = os.path.join(ckpts, "100.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(ckpts, str(LAST)), partial)
    for root, _, files in os.walk(os.path.join(partial, "params")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    mngr = checkpoint.manager(ckpts, read_only=True)
    assert mngr.latest_step() == LAST
    assert 100 not in mngr.all_steps()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    apply_overrides(
        tiny_config,
        {
            "optax_name": "sgd",
            "lr": 1e12,
            "grad_clip_norm": None,
            "ckpt_steps": 1,
            "schedule": {"decay_type": "constant"},
        },
    )
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as info:
        train.train(tiny_config, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    saved = steps(str(tmp_path))
    assert saved and max(saved) < bad_step
    assert f"last good checkpoint is step {max(saved)}" in str(info.value)
    _, params = final_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in params.values())


def test_workdir_of_another_model_is_reported_by_path(reference, tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    tiny_config.model.mlp_dim = 96
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"mlp/wi/kernel.*\(32, 64\)"):
        train.train(tiny_config, workdir)


def test_model_init_shape_mismatch_and_missing(reference, tiny_config, tmp_path):
    apply_overrides(tiny_config, {"model_init": reference, "num_classes": 10})
    with pytest.raises(
        checkpoint.CheckpointMismatchError, match=r"head/kernel: checkpoint \(32, 42\)"
    ):
        train.train(tiny_config, str(tmp_path / "a"))
    apply_overrides(tiny_config, {"num_classes": 42, "model_load": {"dont_load": []}})
    step_dir = os.path.join(reference, "checkpoints", str(steps(reference)[0]))
    tiny_config.model_init = step_dir  # A step directory works too.
    apply_overrides(tiny_config, {"model_load": {"src_subtree": "img", "dst_subtree": "img"}})
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"not found.*head/"):
        train.train(tiny_config, str(tmp_path / "b"))


def test_model_init_subtree_loads_tower_only(reference, tiny_config, tmp_path):
    apply_overrides(
        tiny_config,
        {
            "model_init": reference,
            "total_steps": 2,
            "model_load": {"src_subtree": "img", "dst_subtree": "img", "dont_load": ["head/.*"]},
            "schedule": [("img/.*", None), (".*", {"decay_type": "constant"})],
        },
    )
    result = train.train(tiny_config, str(tmp_path))
    _, ref = final_params(reference)
    final = tree.flatten(result.params)
    for path, x in ref.items():
        if path.startswith("img/"):
            np.testing.assert_array_equal(np.asarray(final[path]), x, err_msg=path)
    # The head starts from its zero init, not from the reference's trained head.
    assert not np.allclose(np.asarray(final["head/kernel"]), ref["head/kernel"], atol=1e-3)


def test_one_process_saves_without_replica_parallel_slicing():
    """Within one process a replicated array is written whole by its first replica (one host writes every
    slice anyway); every other type keeps orbax's standard handler."""
    import jax
    import orbax.checkpoint as ocp

    registry = checkpoint._type_handlers()
    assert jax.process_count() == 1
    assert registry.get(jax.Array)._use_replica_parallel is False
    for ty in ocp.type_handlers.supported_types():
        if ty is not jax.Array:
            assert registry.get(ty) is ocp.type_handlers.get_type_handler(ty)


def test_map_path():
    assert checkpoint._map_path("img/a/b", "img", "") == "a/b"
    assert checkpoint._map_path("a/b", "", "img") == "img/a/b"
    assert checkpoint._map_path("txt/a", "img", "img") is None


def test_rerunning_a_finished_run_changes_nothing(reference, data_dir, capsys):
    from transfer import cli as cli_lib

    before = open(os.path.join(reference, "metrics.jsonl")).read()
    argv = _cli(reference, data_dir)[3:]  # `cappa train ...`, in this process
    assert argv[0] == "train" and cli_lib.main(argv) == 0
    assert f"is complete (step {LAST})" in capsys.readouterr().out
    assert open(os.path.join(reference, "metrics.jsonl")).read() == before
    assert steps(reference)[-1] == LAST
