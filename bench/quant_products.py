"""Which int8 / int4 matrix products are fast on XLA:CPU (why llava_jax.quant's CPU decode path is what it is).

    python bench/quant_products.py [--shapes 4096x4096,3072x1024,...] [--rows 1,2,8] [--repeats 10]

An [F, D] weight times N activation rows, each variant jitted and timed (median of --repeats):
the float32 product (the reference), int8 dequantized then multiplied, a mixed int8 x float32 dot
(`preferred_element_type`), int8 block-32 dequantized, int4 (mixed dot), int8 converted, multiplied and
summed in one loop fusion (no dot), and int8 x int8 -> int32 with the activations quantized on the fly:
once (8 bits) and split in two int8 parts (`quant.int8_product`, about 15 bits). Prints one line per
variant with the weight bytes it streams per second and the ratio to float32, then one JSON line.
The shapes of bench/decode.py's decoder (fused q/k/v 3072x1024, o 1024x1024, fused gate/up 5632x1024,
down 1024x2816, LM head 32064x1024) show where its int8 decode stands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_jax import quant  # noqa: E402


def timed(f, *args, repeats: int) -> float:
    f = jax.jit(f)
    f(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def variants(f: int, d: int):
    rng = np.random.default_rng(0)
    wf = jnp.asarray(rng.standard_normal((f, d)), jnp.float32)
    q8 = jnp.asarray(rng.integers(-127, 128, (f, d)), jnp.int8)
    q4 = jnp.asarray(rng.integers(-8, 8, (f, d)), jnp.int8).astype(jnp.int4)
    scale = jnp.asarray(rng.random(f), jnp.float32)
    blocks = jnp.asarray(rng.random((f, d // 32)), jnp.float32)
    mixed = lambda w, x: jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def once(w, x):  # activations in 8 bits
        s = jnp.max(jnp.abs(x), axis=1) / 127
        y = jnp.einsum("fd,nd->fn", w, jnp.round(x / s[:, None]).astype(jnp.int8), preferred_element_type=jnp.int32)
        return y.astype(jnp.float32) * s[None] * scale[:, None]

    def multiply_sum(w, x):  # one convert-multiply-reduce loop per row (an [F, N, D] broadcast is far slower)
        rows = [jnp.sum(w.astype(jnp.float32) * x[i], axis=1) for i in range(x.shape[0])]
        return jnp.stack(rows, axis=1) * scale[:, None]

    def block_dequantized(w, x):
        wd = (w.reshape(f, d // 32, 32).astype(jnp.float32) * blocks[..., None]).reshape(f, d)
        return jnp.einsum("fd,nd->fn", wd, x)

    return {
        "float32": (lambda w, x: jnp.einsum("fd,nd->fn", w, x), wf),
        "int8 dequantized": (lambda w, x: jnp.einsum("fd,nd->fn", w.astype(jnp.float32) * scale[:, None], x), q8),
        "int8 x float32 mixed dot": (lambda w, x: mixed(w, x) * scale[:, None], q8),
        "int8 block-32 dequantized": (block_dequantized, q8),
        "int4 x float32 mixed dot": (lambda w, x: mixed(w, x) * scale[:, None], q4),
        "int8 multiply-sum fusion": (multiply_sum, q8),
        "int8 x int8 (8-bit acts)": (once, q8),
        "int8 x 2 int8 parts": (lambda w, x: quant.int8_product(w, scale, x), q8),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096", help="comma-separated FxD weight shapes")
    parser.add_argument("--rows", default="1,2,8")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    out = {}
    for shape in args.shapes.split(","):
        f, d = (int(v) for v in shape.split("x"))
        for n in [int(r) for r in args.rows.split(",")]:
            x = jnp.asarray(np.random.default_rng(1).standard_normal((n, d)), jnp.float32)
            base = None
            for name, (fn, w) in variants(f, d).items():
                t = timed(fn, w, x, repeats=args.repeats)
                base = base or t
                out[f"{name} {shape} rows={n}"] = round(t * 1e3, 3)
                rate = quant.parameter_bytes(w) / t / 1e9
                print(f"{shape:>11} rows {n:>3}  {name:<28}{t * 1e3:>9.3f} ms{rate:>7.1f} GB/s{base / t:>8.2f}x float32",
                      flush=True)  # fmt: skip
    print(json.dumps({"ms": out}))

if __name__ == "__main__":
    main()
