"""The environment of a benchmark's child process: fake CPU devices and the malloc setting.

Both are read once, when the process starts (`XLA_FLAGS` by JAX's CPU backend, `GLIBC_TUNABLES` by
the C library), so a benchmark that compares settings runs one child process per setting.

Why the malloc setting matters on CPU hosts: XLA:CPU allocates each execution's temporary buffer
with malloc (2.3 GB for the S/16 CapPa step) and frees it afterwards. glibc serves a block that big
with a fresh `mmap`, so every step page-faults the whole buffer in again, 4 KiB at a time, and the
kernel zeroes each page: ~600k faults and 13-18 % of the CPU time of the step on this machine.
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc ask for transparent huge pages on such
blocks (`madvise(MADV_HUGEPAGE)`; the kernel must allow THP in `madvise` or `always` mode), which cuts
the faults ~100x. The other fix, one heap that keeps freed memory (`arena_max=1`, `mmap_max=0`),
helps on 1 device but serialises 8 device threads on one lock and was slower there.
"""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MALLOC = {
    "default": None,  # whatever the C library does out of the box
    "hugepages": "glibc.malloc.hugetlb=1",  # large malloc blocks on transparent huge pages
}


def child_env(
    devices: int,
    malloc: str = "default",
    extra_xla_flags: tuple[str, ...] = (),
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """`base` (default: this process's environment) with `devices` fake CPU devices, extra XLA flags
    and exactly the `malloc` setting: inherited `glibc.malloc.*` tunables are dropped (a shell that
    exports the hugepages setting must not turn the "default" child into a hugepages one), other
    tunables are kept."""
    if malloc not in MALLOC:
        raise ValueError(f"unknown malloc setting {malloc!r}; choose one of {sorted(MALLOC)}")
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}", *extra_xla_flags])
    tunables = [
        t
        for t in env.pop("GLIBC_TUNABLES", "").split(":")
        if t and not t.startswith("glibc.malloc.")
    ]
    tunables += [MALLOC[malloc]] if MALLOC[malloc] else []
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env
