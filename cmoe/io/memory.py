"""Host memory that tracks the working set: large freed blocks go back to the operating system.

glibc raises its mmap threshold after each large free, so later large tensors come from the heap and
the heap only grows: a layer-by-layer carve of a 0.4B model then peaked at 2.2 GiB instead of 1.3 GiB
(measured in benchmarks/bench_scale.py). A fixed 1 MiB threshold keeps every tensor of that size in its
own mapping, released when freed. No effect (and no error) where the C library is not glibc.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def release_large_blocks_on_free() -> bool:
    """Set the fixed mmap threshold for this process; whether it could be set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
