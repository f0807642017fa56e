"""Helpers shared by the config files (no task or model imports: configs stay data)."""


def parse_arg(arg: str | None, **defaults):
    """`"cap,tokenizer=x.model"` -> dict(defaults, cap=True, tokenizer="x.model"); unknown keys are errors."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        out[key] = value if sep else True
    return out


# The CapPa configs a transfer can start from: configs/cappa_<arch>.py and its image resolution.
ARCHS = {"tiny": 64, "b16": 224, "l16": 256}


def cappa_arch(name):
    """(configs/cappa_<name>.py's config, its resolution): the architecture a fine-tune must match."""
    import importlib

    if name not in ARCHS:
        raise ValueError(f"arch={name!r}: use one of {sorted(ARCHS)}")
    return importlib.import_module(f"configs.cappa_{name}").get_config(), ARCHS[name]


def tower_schedule(tower, warmup):
    """(schedule, lr_mults) of a `tower=frozen|finetune|<lr multiplier>` config arg."""
    cosine = dict(decay_type="cosine", warmup_steps=warmup)
    if tower == "frozen":
        return [("img/.*", None), (".*", cosine)], []  # no gradient, no optimizer state for img/
    if tower == "finetune":
        return cosine, []
    try:
        return cosine, [("img/.*", float(tower))]
    except ValueError:
        raise ValueError(
            f"tower={tower!r}: use frozen, finetune or an lr multiplier such as 0.1"
        ) from None
