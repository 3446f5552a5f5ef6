"""bfloat16 decoding of a LLaVA-1.5-7B-shaped random model on an accelerator, against HBM bandwidth.

    python bench/decode_accelerator.py [--batches 1,32] [--repeats 5] [--layers N] [--quantize int8,int4]

The model is llava_jax's `llava-1.5-7b` preset (CLIP ViT-L/14-336, Vicuna-7B) with random weights,
built on the device; the prompt is one image (576 tokens) and 40 text tokens per row. Decode tok/s as
in bench/decode.py: extra tokens over the extra time between a 1-token and a 65-token generation.
The roofline is the decoder's weight bytes per step against the bandwidth of a large bfloat16
matrix-vector product measured in the same run (at batch B the weights are read once per step for
B tokens, so the batch-B roofline is B times the batch-1 one, ignoring KV-cache reads).
`--quantize` adds rows for the same weights quantized (llava_jax.quant: int8 per channel, int4 in
32-blocks, dequantized inside the jitted products), each against its own bytes per step.
`--layers` shrinks the decoder for a dry run on a small machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHORT, LONG = 1, 65


def bandwidth(n: int, repeats: int) -> float:
    """Bytes per second of y = W x, W [n, n] bfloat16 with float32 accumulation."""
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    x = jnp.ones((n, 1), jnp.bfloat16)
    f = jax.jit(lambda w, x: jnp.dot(w, x, preferred_element_type=jnp.float32))
    f(w, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            f(w, x).block_until_ready()
        times.append((time.perf_counter() - t0) / 10)
    return w.size * 2 / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 32)")
    parser.add_argument("--matvec", type=int, default=32768, help="side of the bandwidth probe's matrix")
    parser.add_argument("--quantize", default="", help="comma-separated quantized rows, e.g. int8,int4")
    args = parser.parse_args()

    from llava_jax import quant
    from llava_jax.config import preset
    from llava_jax.model.llava import LlavaModel
    from llava_jax.pipeline import Pipeline

    config = preset("llava-1.5-7b", dtype="bfloat16", param_dtype="bfloat16", image_aspect_ratio="square")
    if args.layers:
        config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
    bw = bandwidth(args.matvec, args.repeats)
    modes = ["bfloat16"] + [m for m in args.quantize.split(",") if m]
    results = {}
    for mode in modes:
        model = nnx.jit(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))()
        if mode != "bfloat16":
            model = quant.quantize_model(model, mode)
        pipe = Pipeline(model, config)
        del model
        step_bytes = decoder_step_bytes(pipe)
        for b in [int(v) for v in args.batches.split(",")]:
            results[f"{mode}_b{b}"] = {**run_batch(pipe, config, b, args.repeats, bw, step_bytes),
                                       "step_GB": step_bytes / 1e9}  # fmt: skip
        del pipe
    print(f"{jax.devices()[0].device_kind}: {bw / 1e9:.0f} GB/s bfloat16 matvec")
    print(f"{'run':>14}{'GB/step':>9}{'prefill (s)':>13}{'decode tok/s':>14}{'roofline tok/s':>16}{'fraction':>10}")
    for name, r in results.items():
        print(f"{name:>14}{r['step_GB']:>9.2f}{r['prefill_s']:>13.3f}{r['tok_s']:>14.1f}{r['roofline_tok_s']:>16.1f}"
              f"{r['fraction']:>10.1%}")  # fmt: skip
    print(json.dumps({"device": jax.devices()[0].device_kind, "bandwidth_GBps": round(bw / 1e9, 1),
                      **{name: {k: round(v, 4) for k, v in r.items()} for name, r in results.items()}}))  # fmt: skip


def decoder_step_bytes(pipe) -> int:
    """Weight bytes one decode step reads: the decoder's layers, final norm and LM head as stored
    (quantized ones at their integer width), not the embedding table (one row per token)."""
    from llava_jax import quant

    decoder = pipe._state["decoder"]
    total = quant.parameter_bytes({k: v for k, v in decoder.items() if k != "embed"})
    if pipe.config.text.tie_word_embeddings:
        total += quant.parameter_bytes(decoder["embed"])
    return total


def run_batch(pipe, config, b: int, repeats: int, bw: float, step_bytes: int) -> dict:
    rng = np.random.default_rng(0)
    side = config.vision.image_size
    ids = np.concatenate([np.ones((b, 1), np.int64), np.full((b, config.tokens_per_tile), config.image_token_id),
                          rng.integers(3, 32000, (b, 40))], axis=1)  # fmt: skip
    pixels = rng.standard_normal((b, 3, side, side)).astype(np.float32)

    def run(n):
        pipe.feature_cache.clear()
        pipe.generate(ids, pixels, max_new_tokens=n, eos_ids=())

    run(SHORT), run(LONG)
    short, long = [], []
    for _ in range(repeats):
        for n, out in ((SHORT, short), (LONG, long)):
            t0 = time.perf_counter()
            run(n)
            out.append(time.perf_counter() - t0)
    per_step = (statistics.median(long) - statistics.median(short)) / (LONG - SHORT)
    roofline = b * bw / step_bytes
    return {"prefill_s": statistics.median(short), "tok_s": b / per_step, "roofline_tok_s": roofline,
            "fraction": b / per_step / roofline}  # fmt: skip


if __name__ == "__main__":
    main()
