"""A LLaVA-1.5-7B-shaped stage-2 training step in bfloat16 on an accelerator: tokens/s and MFU.

    python bench/train_accelerator.py [--layers 8] [--batch 8] [--length 2048] [--steps 5] [--peak_tflops 989]
    python bench/train_accelerator.py --tiny      # a dry run of the script on CPU

The llava-1.5-7b preset (CLIP ViT-L/14-336, Vicuna-7B) with --layers decoder layers (the full model has
32), random weights created on the device; vision tower frozen, projector + LLM trained with AdamW,
float32 master weights, bfloat16 compute, full remat. Each sequence: BOS, one image (576 tokens), then
text to --length, the text supervised. MFU uses llava_jax.train.flops (as train.py logs it) against
--peak_tflops (the chip's dense bf16 peak, e.g. 989 for H100/H200 SXM) and against a bf16 matmul
measured in this run. The last line is a JSON summary.
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


def measured_peak(n: int, reps: int = 5) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the chip's dense bf16 peak per device")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run on CPU")
    args = parser.parse_args()

    from configs.models import preset
    from llava_jax.config import TextConfig, VisionConfig
    from llava_jax.model.llava import LlavaModel
    from llava_jax.train import flops
    from llava_jax.train.optimizer import Groups, make_optimizer, split_params
    from llava_jax.train.state import TrainState
    from llava_jax.train.step import make_train_step

    config = preset("llava-1.5-7b", dtype="bfloat16", param_dtype="float32", image_aspect_ratio="square")
    config = config.replace(text=dataclasses.replace(config.text, num_layers=args.layers))
    if args.tiny:
        config = config.replace(vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2,
                                                    image_size=56, patch_size=14),
                                text=TextConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_layers=2,
                                                num_heads=2, num_kv_heads=2, head_dim=32))  # fmt: skip
        args.batch, args.length, args.steps = 2, 64, 2
    image_tokens = config.tokens_per_tile
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0), remat=True)))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(LlavaModel(config, rngs=nnx.Rngs(0)))))()
    groups = Groups(((r"projector/.*", 2e-5), (r"decoder/.*", 2e-5)))
    trainable, frozen = split_params(params, groups)
    optimizer, _ = make_optimizer(trainable, groups, total_steps=1000, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1.0)
    state = jax.jit(lambda t: TrainState.create(t, optimizer, 0))(trainable)
    step_fn = make_train_step(graphdef, optimizer)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, (args.batch, args.length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + image_tokens] = config.image_token_id
    labels = np.where(ids == config.image_token_id, -100, ids).astype(np.int32)
    labels[:, 0] = -100
    size = config.vision.image_size
    batch = {"input_ids": ids[None], "labels": labels[None], "attention_mask": np.ones_like(ids)[None],
             "pixel_values": rng.standard_normal((1, args.batch, 3, size, size)).astype(np.float32)}  # fmt: skip
    batch = jax.tree.map(jnp.asarray, batch)

    t0 = time.perf_counter()
    state, metrics = step_fn(state, frozen, batch)
    float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, frozen, batch)
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    step_flops = flops.step_flops(config, np.full(args.batch, args.length), args.batch,
                                  {"vision": 0.0, "projector": 1.0, "decoder": 1.0})  # fmt: skip
    peak = measured_peak(256 if args.tiny else 8192)
    supervised = int((labels[:, 1:] != -100).sum())
    summary = {
        "device": jax.devices()[0].device_kind, "layers": args.layers if not args.tiny else config.text.num_layers,
        "batch": args.batch, "length": args.length, "step_s": step_s, "compile_and_first_step_s": compile_s,
        "supervised_tokens_per_s": supervised / step_s, "tokens_per_s": args.batch * args.length / step_s,
        "step_tflop": step_flops / 1e12, "mfu_vs_nominal": step_flops / step_s / (args.peak_tflops * 1e12),
        "mfu_vs_measured_matmul": step_flops / step_s / peak, "measured_matmul_tflops": peak / 1e12, "loss": loss,
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
