"""Training speed of llava_jax against transformers (PyTorch eager, CPU): one stage-2 step, side by side.

    python bench/train.py [--batch 4] [--repeats 3] [--dtypes float32,bfloat16] [--skip_hf] [--tiny]

The ~300M LLaVA of bench/decode.py (CLIP ViT-B/14 at 224, a 12-layer 1024-wide LLaMA, vocab 32064),
random weights built in transformers and loaded by llava_jax from the same files. A stage-2 step:
vision tower frozen, projector + LLM trained with AdamW (global-norm clipping at 1.0); the same batch
on both sides (B sequences of BOS + 256 image tokens + 40 text tokens, the text supervised).

- supervised tokens/s: supervised targets per step / the median step time (--repeats steps per side
  after two untimed rounds, the sides alternating so both see the same load of this shared machine).
- MFU: llava_jax.train.flops (the same analytic count for both sides: frozen tower forward only,
  no weight gradients for frozen weights) / step time / the matmul peak measured in this run (the
  faster of JAX's and PyTorch's 4096^2 matmul, float32 or bfloat16 as the row computes).
- peak memory: the process's resident memory above its level before the step (sampled every 2 ms
  during every step, warm-up included), both sides measured the same way; for llava_jax also XLA's own figure
  (arguments + outputs + temporaries of the compiled step).
- loss parity: the first step's loss on both sides (float32; same weights, same batch).
Both sides run in this one process, re-executed under llava_jax.host_malloc's glibc settings (set
LLAVA_JAX_DEFAULT_MALLOC=1 to keep glibc's defaults). bf16 rows: llava_jax computes in bfloat16 with
float32 master weights; PyTorch under torch.autocast("cpu", torch.bfloat16). The last line is a JSON
summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import decode  # noqa: E402  (bench/decode.py: the benchmark model)

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=14, hidden_act="quick_gelu", projection_dim=32)  # fmt: skip
TINY_TEXT = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)  # fmt: skip
LR = 1e-5


def batch(size: int):
    """input_ids, labels [B, T] (image positions and BOS unsupervised) and pixel_values [B, 3, S, S]."""
    ids, pixels = decode.prompts(size)
    labels = np.where(ids == decode.IMAGE_TOKEN, -100, ids)
    labels[:, 0] = -100
    return ids.astype(np.int32), labels.astype(np.int32), pixels


class RssPeak:
    """The peak resident set size of this process while the context is open, above its level at entry."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def above_entry(self) -> int:
        return self.peak - self.base


def matmul_peak(dtype: str, n: int = 4096, reps: int = 3) -> float:
    """FLOP/s of the faster of JAX's and PyTorch's n x n matmul in `dtype` (the best of reps)."""
    import torch

    flop = 2.0 * n**3
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    jax_t = min(decode.timed(lambda: f(a).block_until_ready(), 1) for _ in range(reps))
    t = torch.ones((n, n), dtype=getattr(torch, dtype))
    torch.mm(t, t)
    torch_t = min(decode.timed(lambda: torch.mm(t, t), 1) for _ in range(reps))
    return flop / min(jax_t, torch_t)


class JaxSide:
    def __init__(self, directory: str, ids, labels, pixels, compute_dtype: str):
        from flax import nnx

        from llava_jax.model.llava import LlavaModel
        from llava_jax.pipeline import load_model
        from llava_jax.train.optimizer import Groups, make_optimizer, split_params
        from llava_jax.train.state import TrainState
        from llava_jax.train.step import make_train_step

        model, config = load_model(directory, dtype="float32")
        params = nnx.to_pure_dict(nnx.state(model))
        self.config = config.replace(dtype=compute_dtype)
        graphdef = nnx.split(nnx.eval_shape(lambda: LlavaModel(self.config, rngs=nnx.Rngs(0))))[0]
        groups = Groups(((r"projector/.*", LR), (r"decoder/.*", LR)))
        trainable, self.frozen = split_params(params, groups)
        optimizer, _ = make_optimizer(trainable, groups, total_steps=10_000, warmup_ratio=0.0, weight_decay=0.0,
                                      clip_norm=1.0)  # fmt: skip
        self.state = jax.jit(lambda t: TrainState.create(t, optimizer, 0))(trainable)
        self.step_fn = make_train_step(graphdef, optimizer)
        self.batch = {"input_ids": jnp.asarray(ids)[None], "labels": jnp.asarray(labels)[None],
                      "attention_mask": jnp.ones_like(jnp.asarray(ids))[None], "pixel_values": jnp.asarray(pixels)[None]}  # fmt: skip
        compiled = self.step_fn.lower(self.state, self.frozen, self.batch).compile()
        memory = compiled.memory_analysis()
        self.xla_bytes = None if memory is None else int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)  # fmt: skip
        self.fractions = {"vision": 0.0, "projector": 1.0, "decoder": 1.0}

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
        return float(metrics["loss"])


class TorchSide:
    def __init__(self, model, ids, labels, pixels, compute_dtype: str):
        import torch

        self.torch = torch
        self.model = model.train()
        for p in self.model.model.vision_tower.parameters():
            p.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)
        self.inputs = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), labels=torch.as_tensor(labels, dtype=torch.long),
                           pixel_values=torch.as_tensor(pixels), attention_mask=torch.ones(ids.shape, dtype=torch.long))  # fmt: skip
        self.autocast = compute_dtype == "bfloat16"

    def step(self) -> float:
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def measure(sides: dict, repeats: int, warmup: int = 2) -> dict:
    """{name: side} -> {name: {"step_s", "rss_peak_bytes", "first_loss"}}; the sides alternate every step.

    `warmup` untimed rounds first: the first steps of a side allocate its working set (page faults),
    and the other side's steps in between can take memory it freed, so a side settles only after a
    round or two. The peak RSS covers every step, warm-up included."""
    out = {name: {"first_loss": None, "times": [], "rss": 0} for name in sides}
    for round_ in range(warmup + repeats):
        for name, side in sides.items():
            with RssPeak() as rss:
                t0 = time.perf_counter()
                loss = side.step()
                seconds = time.perf_counter() - t0
            if out[name]["first_loss"] is None:
                out[name]["first_loss"] = loss
            if round_ >= warmup:
                out[name]["times"].append(seconds)
            out[name]["rss"] = max(out[name]["rss"], rss.above_entry)
    return {name: {"step_s": statistics.median(r["times"]), "rss_peak_bytes": r["rss"], "first_loss": r["first_loss"]}
            for name, r in out.items()}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side; medians are reported")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="the rows' compute dtypes, in order")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bfloat16 rows (--dtypes float32)")
    parser.add_argument("--skip_hf", action="store_true", help="only llava_jax (no ratios against transformers)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (a dry run of the script)")
    args = parser.parse_args()
    if args.tiny:
        decode.VISION, decode.TEXT = TINY_VISION, TINY_TEXT

    import torch

    from llava_jax.train import flops

    torch.set_num_threads(os.cpu_count())
    ids, labels, pixels = batch(args.batch)
    supervised = int((labels[:, 1:] != -100).sum())
    dtypes = [d for d in args.dtypes.split(",") if not (args.no_bf16 and d == "bfloat16")]
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        hf_model = decode.build_hf(directory)
        for dtype in dtypes:
            sides = {f"llava_jax {dtype}": JaxSide(directory, ids, labels, pixels, dtype)}
            if not args.skip_hf:
                sides[f"transformers {dtype}"] = TorchSide(hf_model, ids, labels, pixels, dtype)
            peak = matmul_peak(dtype)
            results = measure(sides, args.repeats)
            jax_side = sides[f"llava_jax {dtype}"]
            step_flops = flops.step_flops(jax_side.config, np.full(args.batch, ids.shape[1]), args.batch,
                                          jax_side.fractions)  # fmt: skip
            for name, r in results.items():
                rows[name] = {**r, "tokens_per_s": supervised / r["step_s"], "mfu": step_flops / r["step_s"] / peak,
                              "matmul_peak_tflops": peak / 1e12, "step_tflop": step_flops / 1e12}  # fmt: skip
                if name.startswith("llava_jax"):
                    rows[name]["xla_bytes"] = jax_side.xla_bytes
                print(f"{name}: {json.dumps(rows[name])}", flush=True)
            del sides, jax_side, results  # both sides' parameters and optimizer states, before the next dtype's
            gc.collect()
            if hf_model is not None:  # the torch side trained: rebuild it for the next dtype from the same files
                hf_model = None
                gc.collect()
                hf_model = decode.build_hf(directory) if dtype != dtypes[-1] else None
    print(f"\nbatch {args.batch} x {ids.shape[1]} tokens, {supervised} supervised per step, vision tower frozen")
    print(f"{'side':<24}{'step s':>9}{'sup tok/s':>11}{'MFU':>8}{'peak RSS MB':>13}{'first loss':>12}")
    for name, r in rows.items():
        print(f"{name:<24}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.1f}{r['mfu']:>8.1%}{r['rss_peak_bytes'] / 2**20:>13.0f}"
              f"{r['first_loss']:>12.5f}")  # fmt: skip
    summary = {"batch": args.batch, "tokens": int(ids.shape[1]), "supervised_per_step": supervised, "rows": rows}
    for dtype in dtypes:
        if f"transformers {dtype}" in rows:
            summary[f"speedup_{dtype}"] = rows[f"llava_jax {dtype}"]["tokens_per_s"] / rows[f"transformers {dtype}"]["tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    from llava_jax.host_malloc import reexec_for_cpu

    reexec_for_cpu()  # both sides run in this process, under the same glibc settings (see the module)
    main()
