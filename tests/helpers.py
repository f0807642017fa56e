"""Helpers that several test modules use (test modules never import each other).

Run as a script, it is `python -m transfer.cli` that holds still after one checkpoint until a signal arrives:
`python tests/helpers.py STEP train ...` (see `cli(..., pause_at=STEP)`).
"""

import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def cli(workdir, data_dir, *extra_args, pause_at=None, **overrides):
    """`cappa train` on the tiny config as a subprocess argument list; `overrides` become --config.KEY=VALUE.

    `pause_at=STEP`: the run stops after writing the checkpoint of STEP and waits for a signal, so a test can
    kill or preempt it at a known step (a plain run of the tiny config may finish before the signal arrives).
    """
    head = [sys.executable, "-m", "transfer.cli"]
    if pause_at is not None:
        head = [sys.executable, os.path.abspath(__file__), str(pause_at)]
    args = [*head, "train", "--config", TINY, "--workdir", workdir]
    args += [f"--config.input.data.data_dir={data_dir}", *extra_args]
    return args + [f"--config.{k}={v!r}" for k, v in overrides.items()]


def tiny_cappa_model(vocab_size, max_len):
    """The smallest CapPa-shaped model the task tests train: one block per tower, width 32, 8-px patches,
    CapPa's block (RMSNorm + Normformer, GeGLU, no biases)."""
    block = dict(norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False)
    return dict(
        img=dict(width=32, depth=1, num_heads=2, patch_size=8, num_registers=2, **block),
        txt=dict(vocab_size=vocab_size, depth=1, max_len=max_len, **block),
    )


def fit_recipe(total_steps, schedule=None):
    """How the caption, VQA and OCR tests fit their 16 validation examples: Adam at 3e-3, cosine decay
    (unless `schedule`), metrics every 50 steps, one checkpoint at the end, evaluators before and after."""
    return dict(
        total_steps=total_steps,
        ckpt_steps=total_steps,
        optax_name="adamw",
        lr=3e-3,
        schedule=schedule or dict(decay_type="cosine", warmup_steps=10),
        log_training_steps=50,
        log_flops=False,
        eval_at_start=True,
    )


def steps(workdir):
    """The steps of the complete checkpoints in a workdir."""
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def final_params(workdir):
    """(step, {path: numpy array}) of a workdir's latest checkpoint, whatever topology wrote it."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from transfer import checkpoint, tree

    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
    step = mngr.latest_step()
    meta = mngr.item_metadata(step)["params"]
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    args = ocp.args.PyTreeRestore(restore_args=as_numpy)
    out = mngr.restore(step, args=ocp.args.Composite(params=args))["params"]
    mngr.close()
    return step, {k: np.asarray(v) for k, v in tree.flatten(out).items()}


def _cli_paused(pause_at, argv):
    """`transfer.cli.main(argv)`, holding still after the checkpoint of step `pause_at` until a signal.

    SIGTERM is handed on to the handler the loop installed, so the loop sees it exactly as it would any
    preemption notice (and stops after the next step); SIGKILL ends the process while it waits.
    """
    sys.path[0] = ROOT  # Not tests/ (this script's folder): imports resolve as under `python -m`.
    from transfer import checkpoint, cli

    save = checkpoint.save

    def save_then_wait(mngr, step, *args, **kwargs):
        if step != pause_at:
            return save(mngr, step, *args, **kwargs)
        received = []
        loop_handler = signal.getsignal(signal.SIGTERM)
        if not callable(loop_handler):
            raise RuntimeError(
                f"the training loop installed no SIGTERM handler (found {loop_handler!r})"
            )

        def on_sigterm(signum, frame):
            received.append(signum)
            signal.signal(signal.SIGTERM, loop_handler)
            loop_handler(signum, frame)

        # Installed before the checkpoint exists, so the signal a test sends on seeing it is never missed.
        signal.signal(signal.SIGTERM, on_sigterm)
        save(mngr, step, *args, **kwargs)
        mngr.wait_until_finished()
        while not received:  # Ends only when the signal has been handled.
            time.sleep(0.01)

    checkpoint.save = save_then_wait
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_cli_paused(int(sys.argv[1]), sys.argv[2:]))
