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
