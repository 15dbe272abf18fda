"""The benchmark process's malloc settings.

glibc's malloc gives large freed blocks back to the operating system (blocks
above the mmap threshold, and the heap top above the trim threshold) and the
next allocation of that size page-faults every page in again. On a virtual
machine this costs about 1 us per 4 KiB page, ~7 ms for a [32,64,56,56]
float32 tensor, more than the BatchNorm kernel itself, and whether a step pays
it depends on the allocation history of the whole process, so rows would
measure the allocator more than the kernels and change from run to run.

`steady` (the default) keeps freed blocks for reuse, as jemalloc or tcmalloc
(PyTorch's recommended CPU allocators) do; it applies to every implementation
alike. `default` leaves glibc as it is.
"""

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold (HEAP_MAX/2 on 64-bit): blocks up to 32 MiB
# come from the heap; larger ones are still mapped and faulted on every call.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1

MODES = ("steady", "default")


def configure(mode):
    """Applies `mode`; returns a description for the results."""
    if mode == "default":
        return "default malloc settings"
    libc = _glibc()
    if libc is None:
        return "default malloc settings (not glibc)"
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        raise RuntimeError("mallopt failed")
    return ("glibc malloc keeping freed blocks up to 32 MiB for reuse "
            "(mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)")


def available():
    """Whether `steady` can change anything here (glibc's malloc)."""
    return _glibc() is not None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and other non-glibc C libraries
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
