"""The allocator setting every bench entry point times under (python -m bn_ext.bench, .ops, .model)."""

import sys

# glibc malloc returns freed blocks of more than a few MB to the OS, so the next call on a large
# tensor page-faults its output into existence: 1,000+ faults and several ms per call, paid by
# whichever library's allocation pattern trips it (seen on either side here), which measures the
# allocator rather than the kernels. Keeping blocks below 32 MB on the heap (and the heap
# untrimmed) gives both sides the same steady state. --malloc-defaults keeps glibc's defaults.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTING = "glibc mmap_threshold=32MiB trim_threshold=1GiB"


def keep_freed_memory():
    """Apply MALLOC_SETTING in this process; returns the setting, or None where it cannot be set."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return None
    return MALLOC_SETTING if ok else None
