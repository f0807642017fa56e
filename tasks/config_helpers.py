"""Helpers of the transfer configs (caption, VQA, OCR): the CapPa run a transfer starts from, the tower's schedule."""

from __future__ import annotations

from typing import Any

from transfer import config as config_lib

# The CapPa configs a transfer can start from: configs/cappa_<arch>.py and its image resolution.
ARCHS = {"tiny": 64, "b16": 224, "l16": 256}
# The args every CapPa transfer config (caption, VQA, OCR) takes, with their defaults; see their docstrings.
TRANSFER_ARGS = dict(
    data="scenes", arch=None, init=None, tower="frozen", decoder="cappa", tokenizer=None
)


def cappa_arch(name: str, here: str) -> tuple[Any, int]:
    """(cappa_<name>.py's config next to the config file `here`, its resolution): the architecture a
    fine-tune must match."""
    if name not in ARCHS:
        raise config_lib.ConfigError(f"arch={name!r}: use one of {sorted(ARCHS)}")
    return config_lib.sibling(here, f"cappa_{name}.py").get_config(), ARCHS[name]


def tower_schedule(tower: str, warmup: int) -> tuple[Any, list]:
    """(schedule, lr_mults) of a `tower=frozen|finetune|<lr multiplier>` config arg."""
    cosine = dict(decay_type="cosine", warmup_steps=warmup)
    if tower == "frozen":
        return [("img/.*", None), (".*", cosine)], []  # no gradient, no optimizer state for img/
    if tower == "finetune":
        return cosine, []
    try:
        return cosine, [("img/.*", float(tower))]
    except ValueError:
        raise config_lib.ConfigError(
            f"tower={tower!r}: use frozen, finetune or an lr multiplier such as 0.1"
        ) from None
