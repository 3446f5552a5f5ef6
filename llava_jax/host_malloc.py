"""glibc malloc settings for running XLA on the CPU, applied by re-executing the process with them.

XLA:CPU allocates each execution's temporaries as one block (2-3 GB for a batch-1 training step of
bench/train.py's ~300M model), from a worker thread. glibc serves a block that large from a fresh mmap
in that thread's arena and unmaps it when it is freed, so every step faults the whole block in again,
4 KiB at a time: ~600K page faults and 1.5-2.5 s of kernel time per step on the 2-core benchmark
machine, ~0.5-0.8 s of its wall time. With one arena, no mmap and no trimming, the block is carved
from the heap once and reused by every later step. glibc reads these settings only when a process
starts, hence the re-exec; they stay off where JAX may run on an accelerator (device memory has its
own allocator, and one arena would serialise the host's data-loading threads on one lock).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main arena (the heap) ...
    "MALLOC_MMAP_MAX_": "0",  # ... never from a fresh mmap ...
    "MALLOC_TRIM_THRESHOLD_": str(2**40),  # ... and freed memory stays in the heap for the next step
}
OPT_OUT = "LLAVA_JAX_DEFAULT_MALLOC"  # set (to anything) to keep glibc's defaults
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def jax_runs_on_cpu(environ=os.environ) -> bool:
    """Whether JAX will pick the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def needs_reexec(environ=os.environ) -> bool:
    """Whether this process should restart with SETTINGS: glibc Linux, JAX on the CPU, not set, no opt-out."""
    if sys.platform != "linux" or environ.get(OPT_OUT) or platform.libc_ver()[0] != "glibc":
        return False
    if all(environ.get(key) == value for key, value in SETTINGS.items()):
        return False
    return jax_runs_on_cpu(environ)


def reexec_for_cpu() -> None:
    """Restarts this Python process (same interpreter, same command line) with SETTINGS in its
    environment where `needs_reexec`; returns otherwise. Call it first thing in a command's main,
    before anything starts threads or allocates much."""
    if not needs_reexec():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **SETTINGS})
