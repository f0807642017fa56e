"""benchmarks/child_env.py: the child's XLA flags and malloc setting, and that the setting works."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from child_env import DEVICE_COUNT_FLAG, MALLOC, child_env  # noqa: E402


def test_device_count_replaced_and_other_flags_kept():
    base = {"XLA_FLAGS": f"--xla_a=1 {DEVICE_COUNT_FLAG}=4 --xla_b=2", "HOME": "/h"}
    env = child_env(8, extra_xla_flags=("--xla_c=3",), base=base)
    assert env["XLA_FLAGS"].split() == [
        "--xla_a=1",
        "--xla_b=2",
        f"{DEVICE_COUNT_FLAG}=8",
        "--xla_c=3",
    ]
    assert env["HOME"] == "/h" and "GLIBC_TUNABLES" not in env
    assert base["XLA_FLAGS"].endswith("--xla_b=2")  # the caller's dict is not modified


def test_exactly_the_malloc_setting_other_tunables_kept():
    inherited = {
        "GLIBC_TUNABLES": f"glibc.rtld.nns=2:{MALLOC['hugepages']}:glibc.malloc.arena_max=2"
    }
    # A shell that exports the hugepages setting must not turn the default child into one.
    assert child_env(1, "default", base=inherited)["GLIBC_TUNABLES"] == "glibc.rtld.nns=2"
    env = child_env(1, "hugepages", base=inherited)
    assert env["GLIBC_TUNABLES"] == f"glibc.rtld.nns=2:{MALLOC['hugepages']}"
    assert child_env(1, "hugepages", base={})["GLIBC_TUNABLES"] == MALLOC["hugepages"]
    assert "GLIBC_TUNABLES" not in child_env(
        1, "default", base={"GLIBC_TUNABLES": MALLOC["hugepages"]}
    )
    with pytest.raises(ValueError, match="unknown malloc setting 'jemalloc'.*hugepages"):
        child_env(1, "jemalloc", base={})


_FAULTS_OF_A_64MIB_MALLOC = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except (OSError, AttributeError):
        return "unavailable"


@pytest.mark.skipif(
    platform.system() != "Linux"
    or platform.libc_ver()[0] != "glibc"
    or tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2]) < (2, 35)
    or _thp_mode() not in ("always", "madvise"),
    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise or always mode",
)
def test_hugepages_setting_cuts_the_page_faults_of_a_large_block():
    """The reason the setting exists: a fresh 64 MiB block faults in 16,384 small pages by default."""
    faults = {}
    for malloc in ("default", "hugepages"):
        env = child_env(1, malloc, base={"PATH": os.environ.get("PATH", "")})
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_A_64MIB_MALLOC],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        faults[malloc] = int(out.stdout.strip())
    if _thp_mode() == "madvise":
        assert faults["default"] >= 16_000, faults  # 64 MiB / 4 KiB pages
    assert faults["hugepages"] * 4 < faults["default"], faults
