"""Decoding speed of llava_jax against transformers (PyTorch, CPU) on the same ~300M LLaVA.

    python bench/decode.py [--repeats 5] [--skip_hf] [--batches 1,8] [--no_bf16] [--quantize int8,int4]
                           [--decoder bench|7b] [--layers N]

One model of realistic shape (CLIP ViT-B/14 at 224 -> 256 image tokens; a 12-layer 1024-wide LLaMA
with MLP 2816 and vocab 32064), random weights built in transformers, saved with save_pretrained and
loaded with `llava_jax.load`; the same prompt (BOS, one image, text: 297 tokens) on both sides.

- prefill: the time of a 1-token generation (vision tower + prompt + first token), feature cache cleared.
- decode tok/s: (65 - 1) new tokens / (time of a 65-token generation - time of a 1-token one), so
  prefill does not blur it; x batch for the batch-8 rate.
- roofline: decoder weight bytes read per token (layers, final norm, LM head) against the bandwidth of
  a large float32 matrix-vector product sampled between the batch-1 runs: its median sample (the
  load our runs saw) and its best one (a conservative bound).
- int8 / int4 rows: the same checkpoint loaded with `quantize=` (float32 activations; on CPU the
  "copy" layout's int8 x int8 products, see llava_jax.quant), against our float32 in the same run.
- `--decoder 7b`: LLaVA-1.5-7B's decoder layers (4096 wide, MLP 11008, 32 heads; `--layers` of them, default 4)
  in place of the benchmark's small ones, whose float32 matrices (4-12 MB) are read largely from cache;
  a 7B layer's (64-176 MB) are not.
The sides run in turn within every repeat (the machine is shared and its load drifts); every figure is
the median of --repeats runs, and ratios are taken of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
              patch_size=14, hidden_act="quick_gelu", projection_dim=512)  # fmt: skip
TEXT = dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
IMAGE_TOKEN = 32000
TEXT_TOKENS = 40
SHORT, LONG = 1, 65


def build_hf(directory: str):
    import torch
    import transformers

    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of a realistic scale so that activations stay finite
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    model.generation_config.eos_token_id = None  # fixed-length generations on both sides
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model


def prompts(batch: int, seed: int = 0):
    """input_ids [B, 297] and pixel_values [B, 3, 224, 224]: one image each, equal lengths (no padding)."""
    rng = np.random.default_rng(seed)
    image_tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2
    ids = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, image_tokens), IMAGE_TOKEN),
                          rng.integers(3, 32000, (batch, TEXT_TOKENS))], axis=1)  # fmt: skip
    pixels = rng.standard_normal((batch, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
    return ids, pixels


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_runner(model, batch: int):
    import torch

    ids, pixels = prompts(batch)
    ids, pixels = torch.as_tensor(ids), torch.as_tensor(pixels)

    def run(new_tokens: int):
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
        assert out.shape[1] == ids.shape[1] + new_tokens

    return run


def jax_runner(pipe, batch: int):
    ids, pixels = prompts(batch)

    def run(new_tokens: int):
        pipe.feature_cache.clear()
        out = pipe.generate(ids, pixels, max_new_tokens=new_tokens, eos_ids=())
        assert all(len(row) == new_tokens for row in out)

    return run


def measure(runners: dict, repeats: int, bandwidth=None) -> dict:
    """{name: run(new_tokens)} -> {name: {"prefill_s", "decode_s_per_token"}}.

    Every repeat runs each side's 1- and 65-token generations in turn (and samples `bandwidth`, a
    MatvecBandwidth), so that all sides see the same load of this shared machine; figures are the
    medians over repeats.
    """
    for run in runners.values():  # compile / warm up
        run(SHORT), run(LONG)
    times = {name: ([], []) for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name][0].append(timed(lambda: run(SHORT), 1))
            times[name][1].append(timed(lambda: run(LONG), 1))
            if bandwidth is not None:
                bandwidth.sample()
    out = {}
    for name, (short, long) in times.items():
        t_short, t_long = statistics.median(short), statistics.median(long)
        out[name] = {"prefill_s": t_short, "decode_s_per_token": (t_long - t_short) / (LONG - SHORT)}
    return out


class MatvecBandwidth:
    """Bytes per second of y = W x with W [n, n] float32 (256 MiB, beyond the per-core caches)."""

    def __init__(self, n: int = 8192):
        self.w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.x = jnp.ones((n,), jnp.float32)
        self.f = jax.jit(lambda w, x: w @ x)
        self.f(self.w, self.x).block_until_ready()
        self.samples: list[float] = []

    def sample(self, reps: int = 5) -> None:
        t = timed(lambda: [self.f(self.w, self.x).block_until_ready() for _ in range(reps)], 1) / reps
        self.samples.append(self.w.size * 4 / t)

    def median(self) -> float:
        return statistics.median(self.samples)

    def best(self) -> float:
        """The highest sample: the machine's bandwidth when the other tenants left it most (a
        conservative roofline: it can only lower our fraction)."""
        return max(self.samples)


def decoder_bytes_per_token(pipe) -> int:
    """Weight bytes one decode step reads: every decoder layer, the final norm and the LM head
    (the embedding table contributes one row, ignored)."""
    state = pipe._state["decoder"]
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "embed" in names[:1]:
            continue
        total += leaf.size * leaf.dtype.itemsize
    if pipe.config.text.tie_word_embeddings:
        total += pipe._state["decoder"]["embed"][...].nbytes
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; medians are reported")
    parser.add_argument("--skip_hf", action="store_true", help="only llava_jax (no ratios against transformers)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bfloat16 run")
    parser.add_argument("--quantize", default="int8,int4", help="comma-separated quantized rows ('' for none)")
    parser.add_argument("--decoder", default="bench", choices=("bench", "7b"), help="the decoder layers' shape")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 12 bench, 4 7b)")
    args = parser.parse_args()
    if args.decoder == "7b":
        TEXT.update(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    num_hidden_layers=4)  # fmt: skip
    if args.layers:
        TEXT["num_hidden_layers"] = args.layers
    batches = [int(b) for b in args.batches.split(",")]

    import llava_jax

    results: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        hf_model = build_hf(directory)  # also writes the checkpoint that llava_jax loads
        if args.skip_hf:
            hf_model = None
        pipe = llava_jax.load(directory, dtype="float32")
        pipe16 = None if args.no_bf16 else llava_jax.load(directory, dtype="bfloat16")
        quantized = {mode: llava_jax.load(directory, dtype="float32", quantize=mode)
                     for mode in args.quantize.split(",") if mode}  # fmt: skip
        bytes_per_token = decoder_bytes_per_token(pipe)
        bandwidth = MatvecBandwidth()
        for b in batches:
            runners = {f"jax_f32_b{b}": jax_runner(pipe, b)}
            if pipe16 is not None and b == 1:
                runners["jax_bf16_b1"] = jax_runner(pipe16, 1)
            for mode, qpipe in quantized.items():
                runners[f"jax_{mode}_b{b}"] = jax_runner(qpipe, b)
            if hf_model is not None:
                runners[f"hf_f32_b{b}"] = hf_runner(hf_model, b)
            results.update(measure(runners, args.repeats, bandwidth if b == 1 else None))
            for name in runners:
                print(f"{name}: {results[name]}", flush=True)
    if not bandwidth.samples:
        for _ in range(args.repeats):
            bandwidth.sample()
    print_table(results, batches, bandwidth, bytes_per_token, list(quantized))


def rate(r: dict, batch: int) -> float:
    return batch / r["decode_s_per_token"]


def print_table(results: dict, batches: list[int], bandwidth: "MatvecBandwidth", bytes_per_token: int,
                modes: list[str] = ()):  # fmt: skip
    """The table, then one JSON line. The roofline is given for the median bandwidth sample (the
    load our runs saw) and for the best one (a conservative bound)."""
    rooflines = {"median": bandwidth.median() / bytes_per_token, "best": bandwidth.best() / bytes_per_token}
    rows = []
    summary = {"bandwidth_GBps_median": bandwidth.median() / 1e9, "bandwidth_GBps_best": bandwidth.best() / 1e9,
               "decoder_MB_per_token": bytes_per_token / 1e6}  # fmt: skip
    for b in batches:
        ours, ref = results[f"jax_f32_b{b}"], results.get(f"hf_f32_b{b}")
        rows.append((f"prefill b{b} (s)", ours["prefill_s"], ref and ref["prefill_s"],
                     ref and ref["prefill_s"] / ours["prefill_s"]))  # fmt: skip
        rows.append((f"decode b{b} (tok/s)", rate(ours, b), ref and rate(ref, b), ref and rate(ours, b) / rate(ref, b)))
        summary[f"prefill_b{b}_s"] = ours["prefill_s"]
        summary[f"decode_b{b}_tok_s"] = rate(ours, b)
        if ref:
            summary[f"hf_prefill_b{b}_s"], summary[f"hf_decode_b{b}_tok_s"] = ref["prefill_s"], rate(ref, b)
    print()
    print(f"{'float32 unless said':<28}{'llava_jax':>12}{'transformers':>14}{'speed-up':>10}")
    for name, ours, ref, ratio in rows:
        fmt = lambda v, w, p=3: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
        print(f"{name:<28}{fmt(ours, 12)}{fmt(ref, 14)}{fmt(ratio, 9, 2)}x")
    ours_b1 = rate(results["jax_f32_b1"], 1) if "jax_f32_b1" in results else None
    for kind, roofline in rooflines.items():
        gbps = roofline * bytes_per_token / 1e9
        print(f"{'roofline b1 (tok/s), ' + kind:<28}{roofline:>12.2f}   ({bytes_per_token / 1e6:.0f} MB/token at "
              f"{gbps:.1f} GB/s matvec)")  # fmt: skip
        summary[f"roofline_tok_s_{kind}"] = roofline
        if ours_b1:
            print(f"{'decode b1 / roofline':<28}{ours_b1 / roofline:>12.1%}", end="")
            if "hf_f32_b1" in results:
                print(f"{rate(results['hf_f32_b1'], 1) / roofline:>14.1%}", end="")
            print()
            summary[f"decode_b1_roofline_fraction_{kind}"] = ours_b1 / roofline
    if "jax_bf16_b1" in results and ours_b1:
        bf16 = rate(results["jax_bf16_b1"], 1)
        print(f"{'decode b1 bfloat16 (tok/s)':<28}{bf16:>12.2f}{'':>14}{bf16 / ours_b1:>9.2f}x  (vs our float32)")
        summary["decode_b1_bf16_tok_s"], summary["bf16_over_f32"] = bf16, bf16 / ours_b1
    for mode in modes:
        for b in batches:
            q, f32 = rate(results[f"jax_{mode}_b{b}"], b), rate(results[f"jax_f32_b{b}"], b)
            print(f"{f'decode b{b} {mode} (tok/s)':<28}{q:>12.2f}{'':>14}{q / f32:>9.2f}x  (vs our float32)")
            summary[f"decode_b{b}_{mode}_tok_s"], summary[f"{mode}_over_f32_b{b}"] = q, q / f32
        prefill = results[f"jax_{mode}_b{batches[0]}"]["prefill_s"]
        print(f"{f'prefill b{batches[0]} {mode} (s)':<28}{prefill:>12.3f}")
        summary[f"prefill_b{batches[0]}_{mode}_s"] = prefill
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
