"""What bounds bench/decode.py on XLA:CPU: its kernels on its shapes, measured alone.

    python bench/cpu_limits.py [--repeats 5]

The shapes are those of bench/decode.py's model (12 layers, width 1024, MLP 2816, 16 heads of 64,
vocabulary 32064) with its KV cache (400 slots: a 320-slot prompt bucket and 80 new-token slots).
- weights: one decode step's weight products (each layer's qkv, o, gate_up and down, then the LM
  head) run 10 times in a `fori_loop`, as `decode_layout.product` runs them: float32 at 1 and 8 rows,
  bfloat16 at 1 row (given 2 rows, as `pad_columns` does). GB/s and ms per step.
- attention: one step's attention over the KV cache of every layer (the batched matrix-vector
  products of `decode_layout._attend`) at batch 1 and 8, on one CPU device, then split by rows over
  two host devices (a child process with two forced host devices: each device runs on its own
  thread). GB/s and ms per step.
- prefill GEMMs: XLA's x @ W^T against PyTorch's F.linear (all cores) on the prompt's shapes, GFLOP/s.
Last, the floors these put under a batch-8 decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.decode import timed  # noqa: E402
from llava_jax.model.decode_layout import product  # noqa: E402

LAYERS, WIDTH, MLP, HEADS, HEAD_DIM, VOCAB, SLOTS = 12, 1024, 2816, 16, 64, 32064, 400
STEPS = 10  # decode steps per timed call


def median_time(fn, repeats: int) -> float:
    """Median seconds of fn() run to completion, after one call that compiles it."""
    jax.block_until_ready(fn())
    return timed(lambda: jax.block_until_ready(fn()), repeats)


def weight_products(rows: int, dtype: str, repeats: int) -> dict:
    """One decode step's weight products; {"GB_s", "ms_per_step"}."""
    shapes = [(3 * WIDTH, WIDTH), (WIDTH, WIDTH), (2 * MLP, WIDTH), (WIDTH, MLP)] * LAYERS + [(VOCAB, WIDTH)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    weights = [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]
    inputs = (jnp.ones((rows, WIDTH), jnp.float32), jnp.ones((rows, MLP), jnp.float32))
    pad = jnp.dtype(dtype).itemsize == 2

    def step(_, inputs):
        x, h = inputs  # the inputs of width WIDTH and MLP
        for w in weights:  # each output folded into the next inputs: the products run in order
            y = 1e-6 * jnp.mean(product(w, x if w.shape[1] == WIDTH else h, pad_columns=pad), axis=-1, keepdims=True)
            x, h = x + y, h + y
        return x, h

    f = jax.jit(lambda inputs: jax.lax.fori_loop(0, STEPS, step, inputs))
    t = median_time(lambda: f(inputs), repeats) / STEPS
    nbytes = sum(w.size * w.dtype.itemsize for w in weights)
    return {"GB_s": nbytes / t / 1e9, "ms_per_step": t * 1e3}


def attention(batch: int, repeats: int, devices: int = 1) -> dict:
    """One step's attention over every layer's float32 KV cache; {"GB_s", "ms_per_step"}."""
    n = batch * HEADS
    keys = jax.random.split(jax.random.key(1), 2 * LAYERS)
    cache = [jax.random.normal(k, (n, SLOTS, HEAD_DIM), jnp.float32) for k in keys]
    q = jax.random.normal(jax.random.key(2), (n, 1, HEAD_DIM), jnp.float32)

    def attend(q, k, v):  # as decode_layout._attend for one query row per cache row
        scores = jnp.einsum("nqd,nsd->nqs", q, k) * HEAD_DIM**-0.5
        return jnp.einsum("nqs,nsd->nqd", jax.nn.softmax(scores, axis=-1), v)

    def loop(q, cache):
        step = lambda _, q: [q := attend(q, cache[2 * i], cache[2 * i + 1]) for i in range(LAYERS)][-1]
        return jax.lax.fori_loop(0, STEPS, step, q)

    if devices == 1:
        f = jax.jit(loop)
    else:
        mesh, spec = Mesh(jax.devices()[:devices], ("rows",)), PartitionSpec("rows")
        cache = [jax.device_put(c, NamedSharding(mesh, spec)) for c in cache]
        q = jax.device_put(q, NamedSharding(mesh, spec))
        f = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
    t = median_time(lambda: f(q, cache), repeats) / STEPS
    return {"GB_s": sum(c.nbytes for c in cache) / t / 1e9, "ms_per_step": t * 1e3}


def prefill_gemms(repeats: int) -> dict:
    """{f"{rows}x{in}x{out}": {"xla", "torch"}} in GFLOP/s for the prompt's projections."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for rows in (320, 8 * 320):
        for d_in, d_out in ((WIDTH, 3 * WIDTH), (WIDTH, 2 * MLP), (MLP, WIDTH)):
            x = jax.random.normal(jax.random.key(3), (rows, d_in), jnp.float32)
            w = jax.random.normal(jax.random.key(4), (d_out, d_in), jnp.float32)
            f = jax.jit(lambda x, w: jnp.einsum("nd,fd->nf", x, w))
            tx, tw = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(w))
            flops = 2 * rows * d_in * d_out
            xla = flops / median_time(lambda: f(x, w), repeats) / 1e9
            with torch.no_grad():
                ref = flops / median_time(lambda: torch.nn.functional.linear(tx, tw), repeats) / 1e9
            out[f"{rows}x{d_in}x{d_out}"] = {"xla": xla, "torch": ref}
    return out


def attention_on_two_devices(batch: int, repeats: int) -> dict:
    """`attention(batch, devices=2)` in a child process started with two host devices."""
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child_attention", str(batch), "--repeats", str(repeats)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure; medians are reported")
    parser.add_argument("--child_attention", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_attention:
        print(json.dumps(attention(args.child_attention, args.repeats, devices=2)))
        return

    results = {"weights": {}, "attention": {}}
    for label, rows, dtype in (("f32 1 row", 1, "float32"), ("f32 8 rows", 8, "float32"),
                               ("bf16 1 row", 1, "bfloat16")):  # fmt: skip
        results["weights"][label] = weight_products(rows, dtype, args.repeats)
    for batch in (1, 8):
        results["attention"][f"b{batch} one device"] = attention(batch, args.repeats)
        results["attention"][f"b{batch} two devices"] = attention_on_two_devices(batch, args.repeats)
    results["prefill_GFLOP_s"] = prefill_gemms(args.repeats)

    print(f"{'decode step (12 layers + head)':<34}{'GB/s':>8}{'ms/step':>10}")
    for group in ("weights", "attention"):
        for label, r in results[group].items():
            print(f"{group + ', ' + label:<34}{r['GB_s']:>8.1f}{r['ms_per_step']:>10.2f}")
    print(f"\n{'prefill GEMM rows x in x out':<34}{'XLA':>8}{'torch':>8}  GFLOP/s")
    for shape, r in results["prefill_GFLOP_s"].items():
        print(f"{shape:<34}{r['xla']:>8.0f}{r['torch']:>8.0f}  ({r['xla'] / r['torch']:.2f}x)")
    w8, a8 = results["weights"]["f32 8 rows"], results["attention"]["b8 one device"]
    floor = w8["ms_per_step"] + a8["ms_per_step"]
    ratio = results["weights"]["f32 1 row"]["ms_per_step"] / results["weights"]["bf16 1 row"]["ms_per_step"]
    print(f"\nbatch-8 step floor: weights {w8['ms_per_step']:.1f} + attention {a8['ms_per_step']:.1f} = {floor:.1f} ms "
          f"({8e3 / floor:.0f} tok/s) before norms, RoPE, cache writes and sampling")  # fmt: skip
    print(f"bfloat16 over float32, weight products alone: {ratio:.2f}x")
    results["b8_floor_ms"], results["bf16_over_f32_weights"] = floor, ratio
    print(json.dumps(results))


if __name__ == "__main__":
    main()
