"""Embedding workers get glibc's adaptive malloc thresholds back (dask's MALLOC_TRIM_THRESHOLD_ removes them)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# Allocate, touch and free a 16 MiB buffer before and after tune_malloc: was it mmapped, and did
# its pages stay in the heap after free?
_PROBE = r"""
import ctypes, json
from dask_imgcurator.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
SIZE = 16 << 20

def probe():
    buf = libc.malloc(SIZE)
    ctypes.memset(buf, 1, SIZE)
    mmapped = libc.mallinfo2().hblkhd >= SIZE
    libc.free(buf)
    return {"mmapped": mmapped, "kept_after_free": libc.mallinfo2().fordblks >= SIZE}

before = probe()
tune_malloc()
print(json.dumps({"before": before, "after": probe()}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dask_worker_malloc_settings_get_adaptive_thresholds_back():
    result = _probe(MALLOC_TRIM_THRESHOLD_="65536")  # what distributed's nanny sets for its workers
    # before: mmapped and unmapped again on every batch; after: from the heap, and its pages stay
    # there for the next batch instead of being faulted in afresh
    assert result == {"before": {"mmapped": True, "kept_after_free": False},
                      "after": {"mmapped": False, "kept_after_free": True}}


class _RecordingLibc:
    def __init__(self, calls: list):
        self.calls = calls

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def fresh_tune_malloc():
    """``tune_malloc`` as if this process had not run it yet (and left so afterwards)."""
    from dask_imgcurator.malloc import tune_malloc

    tune_malloc.cache_clear()
    yield tune_malloc
    tune_malloc.cache_clear()


@pytest.mark.parametrize("env, expected", [
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, [(-3, 32 << 20), (-1, 64 << 20)]),
    ({"MALLOC_TRIM_THRESHOLD_": str(1 << 30)}, [(-3, 32 << 20), (-1, 1 << 30)]),  # a larger one is kept
    ({"MALLOC_TRIM_THRESHOLD_": "lots"}, [(-3, 32 << 20), (-1, 64 << 20)]),
    ({}, []),  # glibc adapts by itself
    ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, []),  # the user's own choice
], ids=["dask-worker", "larger-trim", "unparsable", "no-malloc-env", "users-mmap-threshold"])
def test_which_thresholds_are_set(env, expected, monkeypatch, fresh_tune_malloc):
    import ctypes

    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls: list = []
    monkeypatch.setattr(ctypes, "CDLL", lambda _: _RecordingLibc(calls))
    fresh_tune_malloc()
    fresh_tune_malloc()  # once per process
    assert calls == expected
