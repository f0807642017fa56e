"""The jitted train step, shared by every task: gradients of the trainable sub-tree only.

Frozen parameters enter the loss as constants, so XLA never builds their backward pass: a frozen tower costs its
forward pass. Per-step randomness is `fold_in(rng, step)`, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from transfer import optim, tree


def make_train_step(
    task: Any,
    tx: optax.GradientTransformation,
    accum_steps: int,
    batch_sharding: jax.sharding.NamedSharding,
    lr_fn: optim.ScheduleFn | None = None,
):
    """The step: gradients of the TRAINABLE params only (frozen ones cost a forward pass).

    `lr_fn(step)` is logged as `lr` from inside the step, so logging never evaluates it eagerly.
    """

    def loss_and_grad(trainable, frozen, batch, rng):
        def loss_of(p):
            return task.loss_fn(tree.merge(p, frozen), batch, rng)

        return jax.value_and_grad(loss_of, has_aux=True)(trainable)

    def accumulate(trainable, frozen, batch, rng):
        """Micro-batch i takes examples i, i+A, i+2A, ...: each stays evenly spread over devices."""

        def split(x):
            x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro = jax.tree.map(split, batch)

        def body(carry, inputs):
            i, mb = inputs
            mb = jax.lax.with_sharding_constraint(mb, jax.tree.map(lambda _: batch_sharding, mb))
            (loss, aux), grads = loss_and_grad(trainable, frozen, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        zeros = jax.eval_shape(
            loss_and_grad, trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng
        )
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1])
        )
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, total)
        return (loss, aux), grads

    def step_fn(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = loss_and_grad if accum_steps == 1 else accumulate
        (loss, aux), grads = grad_fn(state["params"], state["frozen"], batch, rng)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        bad = (state["first_bad"] < 0) & ~jnp.isfinite(loss)
        new_state = dict(
            state,
            params=params,
            opt=opt,
            step=state["step"] + 1,
            first_bad=jnp.where(bad, state["step"] + 1, state["first_bad"]),
        )
        out = {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/param_norm": optax.tree.norm(params),
        }
        out.update({f"train/{k}": v for k, v in aux.items()})
        if lr_fn is not None:
            out["lr"] = lr_fn(state["step"])
        return new_state, out

    return step_fn
