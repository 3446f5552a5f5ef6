"""llava_jax.host_malloc: the re-exec with glibc settings for XLA on the CPU, and what it saves (page faults)."""

import os
import subprocess
import sys
import textwrap

import pytest

from llava_jax import host_malloc

pytestmark = pytest.mark.skipif(not host_malloc.needs_reexec({"JAX_PLATFORMS": "cpu"}),
                                reason="glibc malloc settings apply on glibc Linux only")  # fmt: skip

# A jitted function whose execution allocates ~150 MB of buffers, run a few times; prints the minor page
# faults per call after warm-up.
FAULTS = textwrap.dedent("""
    import resource, sys
    from llava_jax.host_malloc import reexec_for_cpu
    if sys.argv[1] == "tuned":
        reexec_for_cpu()
    import jax, jax.numpy as jnp
    x = jnp.arange(4_000_000, dtype=jnp.float32)
    f = jax.jit(lambda x: jnp.sort(jnp.sin(x))[::2].sum() + jnp.sort(jnp.cos(x))[::3].sum())
    for _ in range(2):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def run(*args, env=None):
    environ = {k: v for k, v in os.environ.items() if k not in host_malloc.SETTINGS and k != host_malloc.OPT_OUT}
    environ.update(JAX_PLATFORMS="cpu", **(env or {}))
    out = subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_needs_reexec_only_on_the_cpu_without_the_settings_or_an_opt_out():
    assert host_malloc.needs_reexec({"JAX_PLATFORMS": "cpu"})
    assert not host_malloc.needs_reexec({"JAX_PLATFORMS": "cpu", **host_malloc.SETTINGS})
    assert not host_malloc.needs_reexec({"JAX_PLATFORMS": "cpu", host_malloc.OPT_OUT: "1"})
    for platforms in ("cuda", "tpu", "cuda,cpu"):
        assert not host_malloc.needs_reexec({"JAX_PLATFORMS": platforms})


def test_reexec_keeps_the_command_line_and_sets_the_environment():
    code = ("from llava_jax.host_malloc import reexec_for_cpu; reexec_for_cpu(); import os, sys; "
            "print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_MAX_'), sys.argv[1:])")
    assert run("-c", code, "--flag", "a b") == "1 0 ['--flag', 'a b']"
    assert run("-c", code, "x", env={host_malloc.OPT_OUT: "1"}) == "None None ['x']"


def test_the_settings_keep_executions_from_faulting_their_buffers_in_again():
    plain, tuned = float(run("-c", FAULTS, "plain")), float(run("-c", FAULTS, "tuned"))
    assert plain > 15_000  # ~40K: the buffers' pages, faulted in on every call
    assert tuned < plain / 3, (plain, tuned)
