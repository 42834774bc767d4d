"""keep_freed_memory: freed buffers are reused instead of page-faulted in anew (glibc only)."""

import ctypes
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys
from jaxlab.host_memory import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

def touch_and_free():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch_and_free()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10 / (n >> 12))  # faults per page
"""


def _glibc() -> bool:
    return platform.system() == "Linux" and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def _probe(mode: str, env=None) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    """Without it every 64 MiB allocation is a fresh mmap whose every page faults on first touch; with it the
    freed block is served again from the heap and no page faults."""
    applied, faults = _probe("plain")
    assert applied == "None" and faults > 0.9
    applied, faults = _probe("keep")
    assert applied == "True" and faults < 0.01


@pytest.mark.skipif(not _glibc(), reason="mallopt thresholds are glibc's")
def test_the_users_malloc_environment_wins():
    import os

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    applied, faults = _probe("keep", env)
    assert applied == "False" and faults > 0.9
