"""Weight-only int8 / int4 for the decoder's linear layers, kept quantized in memory.

A quantized kernel is two parameters in place of `kernel` [..., in, out]:
`qvalue` [..., in, out] (int8, or int4) and `scale` [..., in / block, out] in the parameter dtype:
kernel[..., j, o] ~= qvalue[..., j, o] * scale[..., j // block, o]. Blocks run along the input
(contraction) axis: int8 per output channel by default (one block of `in` rows), int4 in blocks of
32 (llama.cpp's Q4_0), and a GGUF Q8_0 tensor keeps its 32-blocks. Both carry the kernel's logical
`axes`, stacked layers included, so `sharding.state_shardings` lays them out like the float kernel.

`QuantizedLinear` replaces `Linear` by module surgery (`quantize_model`); `Linear` itself is
untouched, so the float path and LoRA's wrapping of `Linear` are as before. The vision tower,
projector, embedding table and norms stay in floating point. `QuantizedLinear` dequantizes inside the
jitted product (what XLA fuses on GPU and TPU); the CPU decode layout (`model/decode_layout.py`)
instead runs int8 x int8 -> int32 products (`int8_product`), see below.

Why not qwix 0.1.8 (tried: `qwix.quantize_model(model, qwix.PtqProvider([QuantizationRule(
module_path="decoder/.*", weight_qtype=int8)]), input_ids)` on the tiny test model):
- the scanned decoder layers stay float: qwix intercepts the products while `scan_layers` runs
  each layer from a split-and-merged slice of the stacked state, so its quantized weights never
  reach the stacked parameters (`decoder.layers.*.kernel` stayed float32); only the unscanned LM
  head was quantized, and then `Linear.__call__`'s `kernel.astype(dtype)` failed on qwix's
  weight (`ValueError: Unsupported type: QArray`);
- the generation path on CPU ("copy" layout) is plain functions over arrays, not NNX modules, so
  qwix's interception would never see its products;
- the products qwix's weight-only mode emits (dequantize, then a float dot) are the slow path on
  XLA:CPU (jaxlib 0.10): a 4096x4096 int8 weight times 2 float32 rows takes 30-39 ms dequantized
  or as a mixed int8 x float dot (`preferred_element_type`), against 2.9 ms for the float32 weight
  and 1.5 ms for int8 x int8 -> int32 (a YNNPACK fusion, `__ynn_fusion` in the compiled HLO).
  int4 weights have no fast kernel (37-50 ms in any orientation), and block-scaled int8 dots
  ran 6-31 ms (bench/quant_products.py reproduces these).
So the CPU decode layout holds int8 per-channel weights and quantizes the activations on the fly,
in two int8 parts (`split_int8`) so that the activations lose nothing a float32 product would keep
(about 15 bits); a weight stored in int4 or in blocks is re-quantized per channel for that layout.
Prefill (many rows, compute-bound) dequantizes each weight once instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from llava_jax.errors import ConfigError
from llava_jax.model.layers import Linear

MODES = ("int8", "int4")
BLOCK = 32  # int4's block (llama.cpp's Q4_0 / Q8_0 block)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one kernel is stored: `bits` 8 or 4; `block` rows per scale along the input axis (None:
    the whole input axis, one scale per output channel)."""

    bits: int
    block: int | None = None

    @property
    def dtype(self):
        return jnp.int8 if self.bits == 8 else jnp.int4

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def blocks(self, d_in: int) -> int:
        return 1 if self.block is None else d_in // self.block


def spec_for(mode: str, d_in: int) -> QuantSpec:
    """The default format of a mode for a kernel with `d_in` inputs."""
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r} is not a quantization mode; use one of {MODES} (or None)")
    if mode == "int8":
        return QuantSpec(8)
    return QuantSpec(4, BLOCK if d_in % BLOCK == 0 else None)


# -- quantize / dequantize ---------------------------------------------------------------------------


def quantize_array(w, spec: QuantSpec, scale_dtype, xp=np):
    """w: [..., in, out] float -> (qvalue [..., in, out] spec.dtype, scale [..., in / block, out]).
    Symmetric rounding to nearest; xp is numpy (host, while loading) or jax.numpy."""
    *lead, d_in, d_out = w.shape
    nb = spec.blocks(d_in)
    blocks = xp.asarray(w, xp.float32).reshape(*lead, nb, d_in // nb, d_out)
    scale = xp.max(xp.abs(blocks), axis=-2) / spec.qmax  # [..., nb, out]
    scale = xp.asarray(scale, scale_dtype).astype(xp.float32)  # round first: q is computed against the stored scale
    safe = xp.where(scale == 0, 1.0, scale)
    q = xp.clip(xp.round(blocks / safe[..., None, :]), -spec.qmax - (spec.bits == 4), spec.qmax)
    q_dtype = (ml_dtypes.int4 if spec.bits == 4 else np.int8) if xp is np else spec.dtype
    return q.reshape(*lead, d_in, d_out).astype(q_dtype), scale.astype(scale_dtype)


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """qvalue [..., in, out], scale [..., nb, out] -> [..., in, out] in dtype."""
    *lead, d_in, d_out = qvalue.shape
    nb = scale.shape[-2]
    blocks = qvalue.astype(dtype).reshape(*lead, nb, d_in // nb, d_out)
    return (blocks * scale.astype(dtype)[..., None, :]).reshape(qvalue.shape)


# -- the module ----------------------------------------------------------------------------------------


class QuantizedLinear(nnx.Module):
    """y = x @ dequantize(qvalue, scale) + bias. qvalue: [in, out]; scale: [in / block, out]."""

    def __init__(self, qvalue: nnx.Param, scale: nnx.Param, bias: nnx.Param | None, dtype):
        self.qvalue = qvalue
        self.scale = scale
        self.bias = nnx.data(bias)
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: Linear, spec: QuantSpec) -> "QuantizedLinear":
        kernel = linear.kernel
        axes = kernel.get_metadata().get("axes")
        q, scale = quantize_array(kernel[...], spec, kernel[...].dtype, xp=jnp)
        return cls(nnx.Param(q, axes=axes), nnx.Param(scale, axes=axes), linear.bias, linear.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = dequantize(self.qvalue[...], self.scale[...], self.dtype)
        y = jnp.dot(x.astype(self.dtype), w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def decoder_linears(model: nnx.Module) -> dict[tuple, Linear]:
    """The decoder's Linear modules by path (from the LlavaModel root): q/k/v/o, gate/up/down, lm_head."""
    return {("decoder", *path): m for path, m in nnx.iter_graph(model.decoder) if isinstance(m, Linear)}


def quantize_model(model: nnx.Module, plan: str | Callable[[tuple, Linear], QuantSpec | None]) -> nnx.Module:
    """Replaces the decoder's Linear layers by QuantizedLinear, in place; returns the model.

    plan: a mode ("int8", "int4") or path, linear -> QuantSpec | None (None keeps it in float).
    Works under `nnx.eval_shape` (abstract quantized models) as on real weights.
    """
    if isinstance(plan, str):
        mode = plan
        plan = lambda path, linear: spec_for(mode, linear.kernel.shape[-2])
    for path, linear in decoder_linears(model).items():
        spec = plan(path, linear)
        if spec is None:
            continue
        parent = model
        for part in path[:-1]:
            parent = getattr(parent, part) if isinstance(part, str) else parent[part]
        setattr(parent, path[-1], QuantizedLinear.from_linear(linear, spec))
    return model


def parameter_bytes(state) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a state, int4 counted as half a byte."""
    total = 0
    for leaf in jax.tree.leaves(state):
        bits = 4 if leaf.dtype in (jnp.int4, jnp.uint4) else 8 * jnp.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape)) * bits // 8
    return total


# -- CPU decode products ---------------------------------------------------------------------------


class Int8Weight(NamedTuple):
    """A weight of the CPU decode layout: q [..., F, D] int8, scale [..., F] float32; w = q * scale[:, None]."""

    q: jax.Array
    scale: jax.Array


def per_channel_int8(qvalue: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Any stored format -> int8 with one scale per output channel: (q [..., in, out], scale [..., out]
    float32). Exact (the same values) for int8 per-channel weights; others are re-quantized."""
    if scale.shape[-2] == 1 and qvalue.dtype == jnp.int8:
        return qvalue, scale[..., 0, :].astype(jnp.float32)
    q, s = quantize_array(dequantize(qvalue, scale, jnp.float32), QuantSpec(8), jnp.float32, xp=jnp)
    return q, s[..., 0, :]


SPLIT = 254.0  # the second int8 part holds the first part's rounding error times this


def split_int8(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [N, D] float -> (hi, lo) int8 [N, D] and a row scale s [N] with
    x ~= s * (hi + lo / SPLIT) to about 15 bits (|error| <= s / (2 * SPLIT))."""
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=-1) / 127.0
    s = jnp.where(s == 0, 1.0, s)
    u = x / s[:, None]
    hi = jnp.round(u)
    lo = jnp.round((u - hi) * SPLIT)
    return hi.astype(jnp.int8), lo.astype(jnp.int8), s


def int8_product(q: jax.Array, scale: jax.Array, x: jax.Array, *, few_rows: int = 64) -> jax.Array:
    """x: [N, D] @ (q * scale).T with q: [F, D] int8, scale: [F] -> [N, F] float32.

    One int8 x int8 -> int32 product of the weight with both activation parts as 2N rows (XLA:CPU's
    fast kernel, which wants at least two rows: exactly what the split gives a single row); up to
    `few_rows` rows as W @ X^T (decoding), more as X @ W^T (prefill)."""
    n = x.shape[0]
    hi, lo, s = split_int8(x)
    parts = jnp.concatenate([hi, lo])
    if n <= few_rows:
        y = jnp.einsum("fd,nd->nf", q, parts, preferred_element_type=jnp.int32)
    else:
        y = jnp.einsum("nd,fd->nf", parts, q, preferred_element_type=jnp.int32)
    y = y.astype(jnp.float32)
    return (y[:n] + y[n:] / SPLIT) * s[:, None] * scale[None, :]


# -- what to quantize when loading -------------------------------------------------------------------

# GGUF tensor types -> the format `quantize="auto"` keeps: Q8_0 and Q4_0 as they are, the other
# quants re-quantized to int8 (5 bits and more) or int4, float types left in float (None).
_GGUF_FLOAT = ("F32", "F16", "BF16")
_GGUF_8BIT = ("Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")


def gguf_spec(types: list[str], d_in: int) -> QuantSpec | None:
    """The format `quantize="auto"` gives a kernel stored in GGUF as `types` (one per layer)."""
    if any(t in _GGUF_FLOAT for t in types):
        return None
    specs = {QuantSpec(8, BLOCK) if t == "Q8_0" else QuantSpec(4, BLOCK) if t == "Q4_0" and d_in % BLOCK == 0
             else spec_for("int8" if t in _GGUF_8BIT else "int4", d_in) for t in types}  # fmt: skip
    if len(specs) == 1:
        return specs.pop()
    return spec_for("int8" if any(s.bits == 8 for s in specs) else "int4", d_in)


def load_plan(mode: str, kernels: dict[str, tuple[int, ...]], file_types: Callable[[str], list[str]] | None = None
              ) -> dict[str, QuantSpec]:  # fmt: skip
    """{kernel path: QuantSpec} for `quantize=mode`. kernels: {kernel path: shape} of the decoder's
    linears; file_types(path): a GGUF file's types of that kernel (mode "auto", which keeps the
    file's own format where it can and leaves float kernels, and checkpoints that are not GGUF, in float)."""
    if mode == "auto":
        if file_types is None:
            return {}
        plan = {path: gguf_spec(file_types(path), shape[-2]) for path, shape in kernels.items()}
        return {path: spec for path, spec in plan.items() if spec is not None}
    return {path: spec_for(mode, shape[-2]) for path, shape in kernels.items()}


def kernel_paths(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{"decoder.layers.attn.q_proj.kernel": shape, ...} of the decoder's linears."""
    return {".".join(map(str, path)) + ".kernel": tuple(m.kernel.shape) for path, m in decoder_linears(model).items()}


def plan_function(plan: dict[str, QuantSpec]) -> Callable[[tuple, Linear], QuantSpec | None]:
    return lambda path, linear: plan.get(".".join(map(str, path)) + ".kernel")


def plan_to_json(plan: dict[str, QuantSpec]) -> dict:
    return {path: [spec.bits, spec.block] for path, spec in plan.items()}


def plan_from_json(data: dict) -> dict[str, QuantSpec]:
    return {path: QuantSpec(int(bits), None if block is None else int(block)) for path, (bits, block) in data.items()}


def model_plan(model: nnx.Module) -> dict[str, QuantSpec]:
    """{kernel path: QuantSpec} of a model's QuantizedLinear layers (what `convert --quantize` records)."""
    plan = {}
    for path, m in nnx.iter_graph(model):
        if isinstance(m, QuantizedLinear):
            d_in, nb = m.qvalue.shape[-2], m.scale.shape[-2]
            bits = 4 if m.qvalue[...].dtype == jnp.int4 else 8
            plan[".".join(map(str, path)) + ".kernel"] = QuantSpec(bits, None if nb == 1 else d_in // nb)
    return plan
