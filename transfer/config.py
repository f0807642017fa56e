"""Configs: Python files with `get_config(arg=None)`, command-line overrides, validation.

A user config is merged over the engine's defaults (and the task's, if it declares any), so every knob has a sane
default and an unknown key is caught at start-up instead of being silently ignored three hours into a run.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

# Sub-trees whose keys are free-form (checked by whoever consumes them, not here).
OPEN_SUBTREES = ("optax", "evals", "model", "input.data")


class UserError(Exception):
    """A mistake in what the user gave (config, data, checkpoint, paths): `cappa` prints the message alone.
    Every other exception is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config that cannot run: the message says which key and how to fix it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the config or command line names does not exist."""


class InputError(UserError, ValueError):
    """A command-line argument or an input the user named (an image, a JSON file, a run) that cannot be used:
    the message says which and what would work."""


def engine_defaults() -> ml_collections.ConfigDict:
    """Every engine knob with its default. big_vision's names where they exist."""
    c = ml_collections.ConfigDict()
    c.task = ""  # Module in tasks/ ("classify") or an import string ("mypkg.mytask").
    c.seed = 0
    c.total_steps = 100
    c.input = dict(
        data=dict(name="scenes", split="train", data_dir=None),
        batch_size=64,  # Global batch, split over hosts and devices.
        pp="",
        shuffle_buffer_size=10_000,
        prefetch=2,
        cache_raw=False,
    )
    # Modules whose pp ops the run's pp strings use besides the engine's (transfer/pp.py), e.g.
    # ["tasks.ocr_pp"]; imported before any pp string is parsed.
    c.pp_modules = []
    # Optimizer: optax by name; `optax` holds extra constructor kwargs (b2, momentum, ...).
    c.optax_name = "adamw"
    c.optax = dict()
    c.lr = 1e-3
    c.wd = 1e-4  # Decoupled, scaled by the schedule (not by lr), as in big_vision.
    # A dict (one schedule for all params) or a list of (regex, dict or None); None freezes.
    c.schedule = dict(decay_type="cosine", warmup_steps=0)
    c.lr_mults = []  # [(regex, mult)]: unmatched params get 1.0.
    c.wd_mults = [(".*/kernel", 1.0)]  # [(regex, mult)]: unmatched params get no weight decay.
    c.grad_clip_norm = 1.0  # Global norm over trainable params; None or 0 disables.
    c.accum_steps = 1  # Micro-batches per step (gradient accumulation inside the step).
    c.log_training_steps = 10
    c.ckpt_steps = 100
    c.keep_ckpts = 3
    c.evals = dict()  # name -> dict(type=..., data=..., pp=..., log_steps=...).
    c.eval_at_start = False  # Also run every evaluator on the initial params (a step-0 row).
    # Mesh axes, product = #devices; -1 takes the remaining devices.
    c.mesh = [("data", -1)]
    c.batch_axes = None  # Mesh axes the batch is split over; None = all of them.
    # [(regex, strategy)]: "fsdp", "replicate", or a tuple partition spec like (None, "fsdp").
    c.sharding_strategy = [(".*", "fsdp")]
    c.fsdp_axes = ["fsdp"]  # Axes "fsdp" shards over (those absent from the mesh are skipped).
    c.fsdp_min_size = 2**14  # Arrays with fewer elements stay replicated.
    c.model_init = None  # A workdir (or checkpoint dir) of another run to load params from.
    # dont_load: regexes of params to keep initialised; skip: regexes of checkpoint names left unused on
    # purpose (any other unused one is an error); *_subtree: map src/<path> to dst/<path>;
    # loader: import string of the function that reads a FILE model_init (directories are orbax runs).
    c.model_load = dict(dont_load=[], skip=[], src_subtree="", dst_subtree="", loader=None)
    c.model = dict()
    # perf/ metrics: FLOPs per example (XLA cost analysis) and MFU against this peak FLOP/s of one
    # device; None = the table of known TPUs/GPUs, else a measured matmul (CPU).
    c.log_flops = True
    c.peak_flops_per_device = None
    return c


def _flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, Mapping):
            keys.extend(_flat_keys(v, path + "."))
    return keys


def _closest(key: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    best = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    if not best:
        return ""
    # Prefer candidates that agree on the last component (`input.batchsize` -> `input.batch_size`).
    leaf = key.rsplit(".", 1)[-1]
    leaves = {c: c.rsplit(".", 1)[-1] for c in candidates}
    by_leaf = difflib.get_close_matches(leaf, list(set(leaves.values())), n=1, cutoff=0.6)
    if by_leaf:
        same = [c for c in candidates if leaves[c] == by_leaf[0]]
        best = difflib.get_close_matches(key, same, n=1, cutoff=0.0) or best
    return best[0]


def _is_open(path: str, open_subtrees: Iterable[str] = OPEN_SUBTREES) -> bool:
    return any(path == p or path.startswith(p + ".") for p in open_subtrees)


def validate_keys(
    user: Mapping, defaults: Mapping, open_subtrees: Iterable[str] = OPEN_SUBTREES
) -> None:
    """Raises ConfigError for the first key of `user` that `defaults` does not know."""
    valid = _flat_keys(defaults)
    valid_set = set(valid)
    for key in _flat_keys(user):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key in valid_set or (parent and _is_open(parent, open_subtrees)):
            continue
        raise ConfigError(
            f"Unknown config key '{key}'. Did you mean '{_closest(key, valid)}'? "
            "(Valid keys are the engine's defaults in transfer/config.py plus the task's.)"
        )


def _merge(defaults: Any, user: Any) -> Any:
    if isinstance(defaults, Mapping) and isinstance(user, Mapping):
        out = dict(defaults)
        for k, v in user.items():
            out[k] = _merge(defaults[k], v) if k in defaults else v
        return out
    return user


def merge_with_defaults(
    user: ml_collections.ConfigDict, extra_defaults: Mapping | None = None
) -> ml_collections.ConfigDict:
    """Validates `user` against engine (+ task) defaults and returns the merged config."""
    defaults = engine_defaults().to_dict()
    open_subtrees = list(OPEN_SUBTREES)
    if extra_defaults:
        extra_defaults = dict(extra_defaults)
        defaults = _merge(defaults, extra_defaults)
        # A sub-tree the task declares (e.g. `model`) is checked key by key.
        open_subtrees = [p for p in open_subtrees if p.split(".")[0] not in extra_defaults]
    user_dict = user.to_dict() if isinstance(user, ml_collections.ConfigDict) else dict(user)
    validate_keys(user_dict, defaults, open_subtrees)
    return ml_collections.ConfigDict(_merge(defaults, user_dict))


def load_config_module(path: str) -> types.ModuleType:
    """The module of config file `path`: configs are data loaded by path, never imported by name."""
    if not os.path.exists(path):
        raise ConfigError(f"Config file '{path}' does not exist.")
    name = "_cappa_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def sibling(here: str, filename: str) -> types.ModuleType:
    """The config module `filename` next to the file `here` (a config's `__file__`)."""
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(here)), filename))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py` or `path/to/config.py:arg` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file '{path}' has no get_config(arg=None) function.")
    config = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    return config


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """A config's arg `"pa,tokenizer=x.model"` -> dict(defaults, pa=True, tokenizer="x.model")."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        out[key] = value if sep else True
    return out


def parse_value(text: str) -> Any:
    """`--config.x=VALUE`: a Python literal if it parses as one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Sets dotted keys in place (the merged config already holds every valid key)."""
    valid = _flat_keys(config.to_dict())
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            sub = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(sub, ml_collections.ConfigDict):
                if _is_open(".".join(parts[: i + 1])) or _is_open(".".join(parts[:i])):
                    with node.unlocked():
                        node[part] = ml_collections.ConfigDict()
                    sub = node[part]
                else:
                    raise ConfigError(
                        f"Unknown config key '{key}'. Did you mean '{_closest(key, valid)}'?"
                    )
            node = sub
        leaf = parts[-1]
        parent = ".".join(parts[:-1])
        if leaf not in node and not (parent and _is_open(parent)):
            raise ConfigError(f"Unknown config key '{key}'. Did you mean '{_closest(key, valid)}'?")
        with node.unlocked():
            old = node.get(leaf)
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            value = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
            try:
                node[leaf] = value
            except TypeError:  # A list where the default is a dict (e.g. per-param schedules).
                del node[leaf]
                node[leaf] = value


def split_cli_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"Override '{arg}' has no value: write --config.{key}=VALUE.")
                value = argv[i + 1]
                i += 1
            overrides[key] = parse_value(value)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
