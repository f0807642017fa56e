"""THE train loop. Every task (classifier, CapPa, SigLiT, probes, caption/OCR/VQA fine-tunes) runs through here.

Read top to bottom: config -> mesh -> input -> task -> state (init, restore or model_init) -> jitted step -> loop with
logging, evaluation, checkpoints, preemption and non-finite-loss handling. A task that needs something the loop lacks
grows the loop's interface for everyone; tasks never fork it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transfer import (
    checkpoint,
    contracts,
    evaluators,
    flops,
    input_pipeline,
    metrics,
    optim,
    registry,
    sharding,
    tree,
)
from transfer import config as config_lib
from transfer import step as step_lib


class NonFiniteLossError(config_lib.UserError, FloatingPointError):
    """The loss became NaN/inf: the message names the step and the last good checkpoint."""


class RunResult(NamedTuple):
    metrics: dict  # The last row written to metrics.jsonl.
    params: Any  # Final parameters (trainable and frozen merged), sharded.


class Preempted(Exception):
    """SIGTERM (or a pod preemption notice) arrived: a checkpoint was saved; rerun to resume."""


def prepare_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, Any]:
    """Resolves the task, fills defaults, and rejects unknown keys and impossible values early."""
    task_module = registry.import_task(config.get("task", ""))
    config = config_lib.merge_with_defaults(config, getattr(task_module, "DEFAULTS", None))
    checks = [
        (
            config.total_steps >= 0,
            "config.total_steps must be >= 0 (0: save and evaluate the initial state, no training)",
        ),
        (config.input.batch_size > 0, "config.input.batch_size must be > 0"),
        (config.accum_steps >= 1, "config.accum_steps must be >= 1"),
        (
            config.input.batch_size % config.accum_steps == 0,
            f"config.input.batch_size={config.input.batch_size} is not divisible by "
            f"config.accum_steps={config.accum_steps}",
        ),
        (config.log_training_steps > 0, "config.log_training_steps must be > 0"),
        (config.ckpt_steps > 0, "config.ckpt_steps must be > 0"),
        (config.lr >= 0 and (config.wd or 0) >= 0, "config.lr and config.wd must be >= 0"),
        (
            config.peak_flops_per_device is None
            or (
                isinstance(config.peak_flops_per_device, (int, float))
                and config.peak_flops_per_device > 0
            ),
            "config.peak_flops_per_device must be None or a positive FLOP/s number (e.g. 197e12)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise config_lib.ConfigError(message + ".")
    return config, task_module


class _StopFlag:
    """Set by SIGTERM; the loop checks it after each step."""

    def __init__(self):
        self.set = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread (e.g. inside some test runners): no handler.
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.set = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _abstract(tree_like: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree_like, shardings
    )


@dataclasses.dataclass
class Run:
    """Everything `run_loop` needs; built by `setup`. Tools (benchmarks, probes) may use the pieces."""

    config: ml_collections.ConfigDict
    workdir: str
    task: Any
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    state: dict
    step_fn: Any  # jitted (state, global batch) -> (state, metrics); donates the state.
    data_iter: Any
    first_batch: dict  # The first local numpy batch (already taken from data_iter).
    mngr: Any
    start_step: int
    evals: dict
    hooks: contracts.TaskHooks  # The task's optional methods, resolved once.
    # The step without micro-batches (same FLOPs per example; XLA counts a loop body once): lowered,
    # never compiled, for the perf/ metrics (`step_fn` itself when accum_steps == 1).
    cost_fn: Any


def train(
    config: ml_collections.ConfigDict, workdir: str, devices: list | None = None
) -> RunResult:
    """Runs (or resumes) a training run in `workdir`.

    `devices` restricts the mesh to some local devices (tests compare 1 vs 8 devices); None = all.
    """
    return run_loop(setup(config, workdir, devices))


def setup(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> Run:
    """Config -> mesh -> input -> task -> state (init, restore or model_init) -> jitted step."""
    sharding.maybe_initialize_distributed()
    config, task_module = prepare_config(config)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    # Mesh and batch sharding.
    mesh = sharding.make_mesh(config.mesh, devices)
    axes = sharding.batch_axes(mesh, config.batch_axes)
    batch_shard = sharding.batch_sharding(mesh, axes)
    sharding.check_batch_size(config.input.batch_size, mesh, axes, "config.input.batch_size")
    sharding.check_batch_size(
        config.input.batch_size // config.accum_steps,
        mesh,
        axes,
        "config.input.batch_size / config.accum_steps",
    )

    # Checkpoints and the input position they hold.
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts)
    resume_step = mngr.latest_step()
    start_position, start_skipped = 0, 0
    if resume_step is not None:
        saved = mngr.restore(
            resume_step, args=checkpoint.ocp.args.Composite(input=checkpoint.ocp.args.JsonRestore())
        )["input"]
        if len(saved["positions"]) != jax.process_count():
            raise ValueError(
                f"The checkpoint at step {resume_step} was written by "
                f"{len(saved['positions'])} hosts, this run has {jax.process_count()}: "
                "resume with the same number of hosts."
            )
        start_position = saved["positions"][jax.process_index()]
        start_skipped = saved.get("skipped", [0] * jax.process_count())[jax.process_index()]
    # config.pp_modules: the op modules of every pp string of the run (evaluators' too).
    data_iter = input_pipeline.TrainIterator(
        config.input,
        seed=config.seed,
        start_position=start_position,
        start_skipped=start_skipped,
        pp_modules=config.pp_modules,
    )
    first_batch = next(data_iter)

    # The task, the parameter rules and the optimizer.
    task = task_module.Task(config)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    # Model code may annotate activations (sharding.constrain_batch) over config.batch_axes.
    with sharding.set_mesh(mesh, config.batch_axes):
        abstract_params = jax.eval_shape(task.init_params, init_rng, first_batch)
    rules = optim.resolve_rules(abstract_params, config)
    tx = optim.make_optimizer(config, rules)
    abs_train, abs_frozen = tree.partition(abstract_params, rules.is_trainable)
    if not abs_train:
        raise config_lib.ConfigError("config.schedule freezes every parameter: nothing to train.")
    param_sh = sharding.tree_shardings(abstract_params, mesh, config)
    train_sh, frozen_sh = tree.partition(param_sh, rules.is_trainable)
    abs_opt = jax.eval_shape(tx.init, abs_train)
    opt_sh = sharding.tree_shardings(abs_opt, mesh, config)
    repl = sharding.replicated(mesh)
    scalar_sh = {"step": repl, "rng": repl, "first_bad": repl}

    # State: restored, or initialised directly in its sharding (never materialised on one device).
    if resume_step is not None:
        checkpoint.check_compatible(mngr, resume_step, abstract_params, workdir)
        abs_train_item = {
            "opt": _abstract(abs_opt, opt_sh),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl),
            "first_bad": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        }
        params, train_item, _ = checkpoint.restore(
            mngr, resume_step, _abstract(abstract_params, param_sh), abs_train_item
        )
        metrics.log(f"Resumed from step {resume_step} in {workdir}.")
    else:
        with sharding.set_mesh(mesh, config.batch_axes):
            params = jax.jit(task.init_params, out_shardings=param_sh)(init_rng, first_batch)
        if config.model_init:
            params, report = load_model_init(config, params, param_sh)
            metrics.log(f"model_init: {report}")
        trainable = tree.partition(params, rules.is_trainable)[0]
        train_item = {
            "opt": jax.jit(tx.init, out_shardings=opt_sh)(trainable),
            "step": jax.device_put(jnp.int32(0), repl),
            "rng": jax.device_put(jax.random.key_data(train_rng), repl),
            "first_bad": jax.device_put(jnp.int32(-1), repl),
        }
    trainable, frozen = tree.partition(params, rules.is_trainable)
    state = {"params": trainable, "frozen": frozen, **train_item}
    del params, train_item
    state_sh = {"params": train_sh, "frozen": frozen_sh, "opt": opt_sh, **scalar_sh}

    def jit_step(accum_steps: int) -> Any:
        return jax.jit(
            step_lib.make_train_step(
                task, tx, accum_steps, batch_shard, optim.lr_schedule(config, rules)
            ),
            in_shardings=(state_sh, batch_shard),
            out_shardings=(state_sh, repl),
            donate_argnums=(0,),
        )

    step_fn = jit_step(config.accum_steps)
    cost_fn = step_fn if config.accum_steps == 1 else jit_step(1)
    evals = evaluators.build(
        config, task=task, mesh=mesh, batch_sharding=batch_shard, param_shardings=param_sh
    )
    return Run(
        config,
        workdir,
        task,
        mesh,
        batch_shard,
        state,
        step_fn,
        data_iter,
        first_batch,
        mngr,
        resume_step or 0,
        evals,
        contracts.TaskHooks.of(task),
        cost_fn,
    )


def load_model_init(
    config: ml_collections.ConfigDict, params: Any, param_sh: Any
) -> tuple[Any, dict]:
    """Another run of ours (a workdir, checkpoints dir or step dir) is loaded by the engine; anything else (a
    big_vision `.npz`, another tool's run directory) by the loader that `config.model_load.loader` names, so the
    engine knows no model format."""
    load_cfg = config.model_load
    if checkpoint.is_run(config.model_init):
        return checkpoint.load_params(config.model_init, params, param_sh, load_cfg)
    if not os.path.exists(config.model_init):
        raise config_lib.MissingFileError(
            f"config.model_init = '{config.model_init}' does not exist."
        )
    if not load_cfg.loader:
        what = "a directory but not a run of ours" if os.path.isdir(config.model_init) else "a file"
        raise config_lib.ConfigError(
            f"config.model_init = '{config.model_init}' is {what}: set config.model_load.loader to "
            "the import string of a loader for its format (e.g. 'pretrain.ckpt_import:load_into')."
        )
    loader = registry.import_object(load_cfg.loader)
    loaded, report = loader(
        jax.device_get(params),
        config.model_init,
        prefix=load_cfg.src_subtree,
        dst_prefix=load_cfg.dst_subtree,
        dont_load=list(load_cfg.dont_load),
        skip=list(load_cfg.get("skip") or []),
        model=config.get("model", {}).to_dict(),
    )
    counts = {f"model_init/{k}": v for k, v in report.items() if isinstance(v, int)}
    return jax.device_put(loaded, param_sh), counts


def _is_due(every: int | None, step: int, total: int) -> bool:
    """An evaluator logging every `every` steps runs at this step (and always at the last one)."""
    return step == total or bool(every and step % every == 0)


def _run_evals(
    evals: dict, state: dict, step: int, total: int, workdir: str, every_one: bool = False
) -> dict:
    """Due evaluators (all of them at the last step, or with `every_one`); an evaluator with a
    `write(workdir, step, name)` method then writes its files (predictions, samples) on process 0."""
    out = {}
    for name, (evaluator, every) in evals.items():
        if every_one or _is_due(every, step, total):
            t0 = time.perf_counter()
            results = evaluator.run(tree.merge(state["params"], state["frozen"]))
            out.update({f"{name}/{k}": v for k, v in results.items()})
            out[f"{name}/seconds"] = time.perf_counter() - t0
            write = contracts.optional(evaluator, contracts.Writer)
            if write and jax.process_index() == 0:
                write(workdir, step, name)
    return out


def _check_finite(state: dict, mngr: Any, workdir: str) -> None:
    first_bad = int(jax.device_get(state["first_bad"]))
    if first_bad >= 0:
        mngr.wait_until_finished()
        last = mngr.latest_step()
        where = (
            f"the last good checkpoint is step {last} in {workdir}/checkpoints"
            if last is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"The training loss became NaN/inf at step {first_bad}; stopped, {where}. Lower config.lr, "
            "set config.grad_clip_norm, or check the input data; rerunning resumes from that checkpoint."
        )


def _save(mngr: Any, step: int, state: dict, data_iter: Any) -> None:
    positions = checkpoint.gather_ints(data_iter.position)
    skipped = checkpoint.gather_ints(data_iter.stats()["input/skipped"])
    train_item = {k: state[k] for k in ("opt", "step", "rng", "first_bad")}
    checkpoint.save(
        mngr,
        step,
        tree.merge(state["params"], state["frozen"]),
        train_item,
        {"positions": positions, "skipped": skipped, "step": step},
    )


def _measure_perf(run: Run, state: dict, local_batch: dict) -> flops.Perf:
    """Lowers the step once (the loop's own trace when accum_steps == 1; nothing is compiled twice), or
    not at all when the task counts its own FLOPs."""
    batch = {
        k: jax.ShapeDtypeStruct(
            (v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype, sharding=run.batch_sharding
        )
        for k, v in local_batch.items()
    }
    config = run.config
    count = run.hooks.flops_per_example  # The task knows its model FLOPs better than XLA.
    perf = flops.measure_step(
        run.cost_fn,
        (state, batch),
        config.input.batch_size,
        run.mesh,
        config.peak_flops_per_device,
        per_example=None if count is None else lambda: count(local_batch),
    )
    metrics.log(perf.describe())
    return perf


def _zero_step_run(run: Run) -> RunResult:
    """total_steps = 0: the initial (or model_init-loaded) state becomes checkpoint 0 and every evaluator
    runs once. The untrained baseline of a comparison, or an evaluation of a loaded checkpoint, without
    compiling a train step."""
    state, workdir = run.state, run.workdir
    writer = metrics.MetricsWriter(workdir, resume_step=0)
    try:
        with sharding.set_mesh(run.mesh, run.config.batch_axes):
            row = writer.write(0, _run_evals(run.evals, state, 0, 0, workdir, every_one=True))
        _save(run.mngr, 0, state, run.data_iter)
        run.mngr.wait_until_finished()
    finally:
        writer.close()
        run.mngr.close()
    metrics.log(f"total_steps = 0: saved the initial state as step 0 in {workdir}.")
    return RunResult(row, tree.merge(state["params"], state["frozen"]))


def run_loop(run: Run) -> RunResult:
    """Steps, logging, evaluation, checkpoints, preemption: the only loop every task runs."""
    config, workdir, state, data_iter, mngr = (
        run.config,
        run.workdir,
        run.state,
        run.data_iter,
        run.mngr,
    )
    step_fn, batch_shard, start_step, evals = (
        run.step_fn,
        run.batch_sharding,
        run.start_step,
        run.evals,
    )
    first_batch = run.first_batch
    if config.total_steps == 0 and mngr.latest_step() is None:
        return _zero_step_run(run)
    if start_step >= config.total_steps:
        mngr.close()
        metrics.log(f"{workdir} is complete (step {start_step}); nothing to do.")
        path = os.path.join(workdir, "metrics.jsonl")
        rows = metrics.read_jsonl(path) if os.path.exists(path) else []
        return RunResult(rows[-1] if rows else {}, tree.merge(state["params"], state["frozen"]))
    run.state = None  # Donated by the first step; the loop owns the state from here.
    total = config.total_steps
    writer = metrics.MetricsWriter(workdir, resume_step=start_step)
    progress = metrics.Progress(total, config.input.batch_size, start_step)
    stop = _StopFlag()
    stop.install()
    context = contextlib.ExitStack()  # The mesh in context: model code may annotate activations.
    context.enter_context(sharding.set_mesh(run.mesh, config.batch_axes))
    pending, last_row = [], {}
    step, batch = start_step, first_batch
    try:
        perf = _measure_perf(run, state, first_batch) if config.log_flops else None
        if config.eval_at_start and start_step == 0 and evals:  # The "before" row of the run.
            writer.write(0, _run_evals(evals, state, 0, total, workdir, every_one=True))
        while step < total:
            if batch is None:
                t0 = time.perf_counter()
                batch = next(data_iter)
                progress.input_wait(time.perf_counter() - t0)
            state, step_metrics = step_fn(state, sharding.put_batch(batch, batch_shard))
            batch = None
            step += 1
            pending.append(step_metrics)
            if step == start_step + 1:
                jax.block_until_ready(step_metrics)
                progress.reset(step)  # Compile time is not speed.
            # Preemption: log and save at this step, then exit; rerunning resumes exactly here.
            stopping = stop.set or mngr.reached_preemption(step)
            is_log = step % config.log_training_steps == 0 or step == total or stopping
            row: dict[str, Any] = {}
            speed: dict[str, float] = {}
            if is_log and pending:
                fetched = jax.device_get(pending)
                # Training metrics are averaged over the window; the lr is the current one.
                row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                row["lr"] = float(fetched[-1].get("lr", 0.0))
                pending = []
                speed = progress.measure(step)
                row.update(speed)
                row.update(perf.row(speed) if perf else {})
                row.update(data_iter.stats())
                _check_finite(state, mngr, workdir)
            save_due = step % config.ckpt_steps == 0 or step == total or stopping
            off_step = save_due or any(_is_due(every, step, total) for _, every in evals.values())
            if off_step:  # Evaluators and checkpoints are not train-step speed (Progress.exclude).
                jax.block_until_ready(step_metrics)
                off_start = time.perf_counter()
            row.update(_run_evals(evals, state, step, total, workdir))
            if row:
                last_row = writer.write(step, row)
                if is_log:
                    metrics.log(progress.line(step, speed, row))
            if save_due:
                _check_finite(state, mngr, workdir)
                _save(mngr, step, state, data_iter)
            if stopping and step < total:
                mngr.wait_until_finished()
                raise Preempted(
                    f"Stopped by SIGTERM at step {step}; checkpoint saved in {workdir}. "
                    "Run the same command again to resume."
                )
            if off_step:
                progress.exclude(time.perf_counter() - off_start)
        mngr.wait_until_finished()
    finally:
        context.close()
        stop.uninstall()
        writer.close()
        mngr.close()
    # Optional task hook: reports a person reads (tables, plots) from the finished run's metrics.jsonl.
    if step == total and run.hooks.finalize and jax.process_index() == 0:
        run.hooks.finalize(workdir)
    return RunResult(last_row, tree.merge(state["params"], state["frozen"]))
