"""Several JAX processes (hosts) in one run: starting the distributed runtime, and what they must agree on.

Every process runs the same command. `initialize` starts `jax.distributed` before anything touches a
device: from JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or from what JAX
detects (SLURM, Open MPI, TPU pod slices). The helpers below are no-ops with one process, so the
single-process trainer pays nothing for them; with several, each is one small collective.
"""

from __future__ import annotations

import os

import numpy as np

MODES = ("auto", "yes", "no")


def cluster_requested() -> bool:
    """Whether the environment asks for several processes: a coordinator address, or a SLURM / Open MPI
    job of more than one task. (TPU pod slices are detected by JAX itself: pass mode "yes" there.)"""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return False


def initialize(mode: str = "auto", timeout_s: int = 300) -> bool:
    """Starts jax.distributed where `mode` ("auto": where cluster_requested(); "yes"; "no") says to;
    returns whether it did. Must run before the first JAX computation."""
    import jax

    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if mode == "no" or (mode == "auto" and not cluster_requested()):
        return False
    kwargs = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            kwargs[key] = int(os.environ[name])
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    return True


def _gather(value) -> np.ndarray:
    """[process_count, ...]: every process's value (host numpy)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. one of them received SIGTERM)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    return bool(_gather(np.int32(bool(flag))).any())


def max_over_processes(value: int) -> int:
    import jax

    if jax.process_count() == 1:
        return int(value)
    return int(_gather(np.int32(value)).max())


def sum_over_processes(value: float) -> float:
    import jax

    if jax.process_count() == 1:
        return float(value)
    return float(_gather(np.float32(value)).sum())


def gather(value: np.ndarray) -> np.ndarray:
    """[process_count, *value.shape]: the same array from every process (value[None] with one)."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(value)[None]
    return _gather(value)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name (e.g. after process 0 wrote a file)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
