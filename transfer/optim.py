"""Optimizers by name, schedules, and regex rules for freezing, lr / weight-decay multipliers and layer-wise lr decay.

The update of a trainable parameter p with optimizer direction d (d = -gradient for sgd, the Adam step for adam, ...) is

    p <- p + s(t) * lr_mult(p) * (lr * d - wd * wd_mult(p) * p)

where s(t) is the warmup/decay schedule of p's rule. Weight decay is decoupled and follows the schedule, not
lr, as in big_vision (so `wd=1e-4` there means the same here). Frozen parameters (schedule None) are split off
before the optimizer ever sees them: they get no state and no gradient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from transfer import tree
from transfer.config import ConfigError

ScheduleFn = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------- schedules
def make_schedule(sched: Mapping | None, total_steps: int) -> ScheduleFn:
    """A multiplier in [0, 1] per step: linear warmup then cosine / linear / rsqrt / constant decay."""
    sched = dict(sched or {})
    decay_type = sched.pop("decay_type", "cosine")
    warmup = int(sched.pop("warmup_steps", 0) or 0)
    if "warmup_percent" in sched:
        warmup = int(sched.pop("warmup_percent") / 100 * total_steps)
    end = float(sched.pop("linear_end", sched.pop("min_lr_mult", 0.0)))
    timescale = float(sched.pop("timescale", 10_000))
    cooldown = int(sched.pop("cooldown_steps", 0) or 0)
    if sched:
        raise ConfigError(
            f"Unknown schedule keys {sorted(sched)}; valid: decay_type, warmup_steps, "
            "warmup_percent, linear_end, min_lr_mult, timescale, cooldown_steps."
        )
    decay_steps = max(total_steps - warmup, 1)

    def fn(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if decay_type == "cosine":
            decay = end + (1 - end) * 0.5 * (1 + jnp.cos(math.pi * progress))
        elif decay_type == "linear":
            decay = 1 - (1 - end) * progress
        elif decay_type == "rsqrt":
            decay = 1 / jnp.sqrt(1 + jnp.maximum(step - warmup, 0) / timescale)
        elif decay_type in ("constant", "const"):
            decay = 1.0
        else:
            raise ConfigError(
                f"Unknown decay_type '{decay_type}': use cosine, linear, rsqrt or constant."
            )
        if cooldown > 0:
            decay = decay * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
        return jnp.where(step < warmup, warm, decay) * 1.0

    return fn


# ---------------------------------------------------------------------------------------------- rules
class ParamRules(NamedTuple):
    """Per-parameter decisions, all keyed by path. `schedule_index` is None for frozen params."""

    schedule_index: dict[str, int | None]
    schedules: list[Mapping]
    lr_mult: dict[str, float]
    wd_mult: dict[str, float]

    def is_trainable(self, path: str) -> bool:
        return self.schedule_index[path] is not None


def resolve_rules(params: Mapping, config: Any) -> ParamRules:
    """Applies config.schedule / lr_mults / wd_mults to every parameter path."""
    paths = list(tree.flatten(params))
    sched_cfg = config.schedule
    if isinstance(sched_cfg, (list, tuple)):
        rules = tree.check_rules(sched_cfg, "schedule")
    else:
        rules = [(".*", sched_cfg)]
    schedules: list[Mapping] = []
    schedule_index: dict[str, int | None] = {}
    unmatched = []
    for path in paths:
        for i, (pattern, sched) in enumerate(rules):
            if tree.first_match(path, [(pattern, True)], default=False):
                schedule_index[path] = None if sched is None else i
                break
        else:
            unmatched.append(path)
    if unmatched:
        raise ConfigError(
            f"config.schedule matches no rule for {len(unmatched)} parameter(s), e.g. "
            f"{unmatched[:3]}; every parameter must be matched (add ('.*', None) to freeze "
            "the rest, or a catch-all schedule)."
        )
    schedules = [None if s is None else dict(s) for _, s in rules]
    lr_rules = tree.check_rules(config.get("lr_mults"), "lr_mults")
    wd_rules = tree.check_rules(config.get("wd_mults"), "wd_mults")
    lr_mult = {p: _multiplier(p, lr_rules, 1.0, "lr_mults") for p in paths}
    wd_mult = {p: _multiplier(p, wd_rules, 0.0, "wd_mults") for p in paths}
    return ParamRules(schedule_index, schedules, lr_mult, wd_mult)


def _multiplier(path: str, rules: list[tuple[str, Any]], default: float, name: str) -> float:
    """A rule's number; a rule whose value is a string rejects the parameters it matches, with
    that string as the reason (how `layerwise_lr_mults` refuses a scanned encoder)."""
    value = tree.first_match(path, rules, default)
    if isinstance(value, str):
        raise ConfigError(f"config.{name} rejects parameter '{path}': {value}")
    return float(value)


_SCANNED = (
    "layer-wise lr decay needs model.scan=False: a scanned encoder stacks all blocks in one array "
    "per parameter, which per-layer path rules cannot address."
)
_DEEPER = (
    "the tower has more blocks than the depth={} given to layerwise_lr_mults; pass its model.depth."
)


def layerwise_lr_mults(
    depth: int, decay: float, prefix: str = "img"
) -> list[tuple[str, float | str]]:
    """`config.lr_mults` rules for layer-wise lr decay of the ViT tower under `prefix` (BEiT's convention).

    Layer ids: 0 = the stem (`embedding`, `pos_embedding`, `cls`, `registers`), block i = i + 1, and everything
    after the encoder (`encoder/norm_final`, `map`, the task's head) = depth + 1. A parameter of layer id k gets
    `decay ** (depth + 1 - k)`: the head trains at the full lr, each block below it `decay` times slower. The
    last group needs no rule (unmatched parameters keep 1.0), so rules appended after these still apply.

    Rules with string values make `resolve_rules` fail clearly instead of silently giving 1.0 to blocks that
    these rules cannot address: a scanned encoder (`encoder/blocks/...`, one array stacking all layers; set
    model.scan=False) and blocks beyond `depth` (pass the tower's depth). A tower with fewer blocks than `depth`
    is not detected: its stem just decays more.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(
            f"layerwise_lr_mults: depth must be a positive int (model.depth), got {depth!r}"
        )
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"layerwise_lr_mults: decay must lie in (0, 1], got {decay!r}")
    prefix = prefix.strip("/")
    pre = re.escape(prefix) + "/" if prefix else ""
    rules: list[tuple[str, float | str]] = [
        (f"{pre}(embedding/.*|pos_embedding|cls|registers)", float(decay ** (depth + 1)))
    ]
    rules += [(f"{pre}encoder/block_{i}/.*", float(decay ** (depth - i))) for i in range(depth)]
    rules.append((rf"{pre}encoder/block_\d+/.*", _DEEPER.format(depth)))
    rules.append((f"{pre}encoder/blocks/.*", _SCANNED))
    return rules


# ---------------------------------------------------------------------------------------------- optimizer
def _direction(name: str, kwargs: Mapping) -> optax.GradientTransformation:
    """The optimizer's step direction at learning rate 1 (weight decay is added by the rules)."""
    kwargs = dict(kwargs)
    if name in ("adamw", "adam"):
        return optax.adam(1.0, **kwargs)
    if name == "adafactor":
        return optax.adafactor(1.0, **kwargs)
    if name == "lion":
        return optax.lion(1.0, **{"weight_decay": 0.0, **kwargs})
    if name == "sgd":
        return optax.sgd(1.0, **kwargs)
    if name == "momentum":
        return optax.sgd(1.0, **{"momentum": 0.9, **kwargs})
    if name == "muon":
        return optax.contrib.muon(1.0, **kwargs)
    factory = getattr(optax, name, None)
    if factory is None:
        raise ConfigError(
            f"Unknown optax_name '{name}': use adamw, adam, adafactor, lion, sgd, "
            "momentum, muon or any optax optimizer taking a learning rate."
        )
    return factory(1.0, **kwargs)


class RulesState(NamedTuple):
    count: jax.Array


def scale_by_rules(
    lr: float, wd: float, rules: ParamRules, total_steps: int
) -> optax.GradientTransformation:
    """Turns a unit-lr direction into the final update following the formula in the module doc."""
    sched_fns = [None if s is None else make_schedule(s, total_steps) for s in rules.schedules]

    def init_fn(params):
        del params
        return RulesState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_rules needs params (for weight decay).")
        scales = [None if f is None else f(state.count) for f in sched_fns]

        def one(path, u, p):
            key = "/".join(str(getattr(k, "key", k)) for k in path)
            s = scales[rules.schedule_index[key]]
            wd_term = wd * rules.wd_mult[key] * p if wd and rules.wd_mult[key] else 0.0
            return (s * rules.lr_mult[key] * (lr * u - wd_term)).astype(u.dtype)

        new = jax.tree_util.tree_map_with_path(one, updates, params)
        return new, RulesState(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: Any, rules: ParamRules) -> optax.GradientTransformation:
    """clip -> optimizer direction -> schedule, lr/wd multipliers and decoupled weight decay."""
    parts = []
    if config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    parts.append(_direction(config.optax_name, config.get("optax") or {}))
    parts.append(
        scale_by_rules(float(config.lr), float(config.wd or 0.0), rules, int(config.total_steps))
    )
    return optax.chain(*parts)


def lr_schedule(config: Any, rules: ParamRules) -> ScheduleFn:
    """The effective lr of the first trainable rule per step, logged by the jitted step."""
    for sched in rules.schedules:
        if sched is not None:
            fn = make_schedule(sched, int(config.total_steps))
            return lambda step: float(config.lr) * fn(step)
    return lambda step: jnp.zeros([], jnp.float32)
