"""Benchmarks: accuracy, detection, hardware latency, coverage and engine time, and the
side-by-side suite against Torch-Pruning.

Two process-wide settings keep a model's time its own when a harness times several models in
turn in one process:

- oneDNN's primitive cache (1024 entries by default) would thrash: a dozen models evict each
  other's conv primitives, and a globally pruned model, whose layers all differ in shape,
  rebuilds them on every call (a pruned ResNet-50 timed 0.91x instead of 1.74x). One deployed
  model never sees this, so the cache gets room for all of them. oneDNN reads the variable
  when it first builds a primitive, so setting it here, before any model runs, is enough
  (checked: 1500 conv shapes run, then the first 200 again, took 223 us a call at the default
  and 103 us so).
- glibc's malloc hands large freed blocks back to the OS when the heap's free top outgrows a
  threshold that moves with what was freed before; the next call maps them again. Dense
  YOLOv8s at 640 px took 13,000-25,000 page faults a call (about 15% of its eager time) or
  none, depending on what the process had run before, while its pruned models took none: its
  speedup moved with the process's history. :func:`pin_malloc` fixes both thresholds, as
  jemalloc or tcmalloc (which PyTorch's CPU tuning guide recommends) would; set
  ``PRUNERS_BENCH_MALLOC=default`` to time with glibc's defaults.
"""

import ctypes
import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

#: glibc's ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_malloc() -> bool:
    """Keep freed memory in the process (glibc: no trimming, and blocks up to 1 GiB, or 32 MiB
    where glibc caps the threshold there, from the heap); False where the C library is not
    glibc or ``PRUNERS_BENCH_MALLOC=default``."""
    if os.environ.get("PRUNERS_BENCH_MALLOC") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)) and \
        bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20))


#: Whether :func:`pin_malloc` took (named in the timed tables' headers).
MALLOC_PINNED = pin_malloc()
