"""The C allocator told to keep the memory a training step frees, for the next step to reuse.

Every training step allocates and frees the same large buffers: at batch 512, activations and
their gradients of up to 32 MB each. glibc's malloc, by default, hands such blocks back to the
kernel (it maps blocks above a threshold with mmap and unmaps them on free, and trims the top of
its heap), so each step faults every page of them in again: 2.2 million page faults in 20 steps
of the default run, 0.15 million with these settings, which make a plain epoch 9-16% faster on
2 cores and the default run's training 0-9% (docs/benchmarks.md, "The memory allocator"). Which
memory holds a tensor does not change what is computed: results stay the same to the last
digit. Peak memory may grow (the fast preset's by 18%).
"""

from __future__ import annotations

import ctypes

# mallopt(3)'s parameters (<malloc.h>): no block is served by mmap, and trimming is off (-1).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NO_TRIMMING = -1


def keep_freed_memory() -> bool:
    """Have malloc serve every block from its heap and never give freed memory back to the
    kernel. Process-wide and for the allocations that follow; False where the C library has no
    such settings (musl's mallopt does nothing, macOS has none), which keeps its own policy."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIMMING))
