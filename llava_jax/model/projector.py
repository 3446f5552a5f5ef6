"""The multimodal projector: vision features -> decoder embedding space.

'linear' (LLaVA 1.0), 'mlpNx_gelu' (N linear layers with exact GELU between them; 1.5 and 1.6 use
mlp2x_gelu) and 'identity'. The layers are named linear_1 ... linear_N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import projector_depth
from llava_jax.model.layers import Linear, gelu


class Projector(nnx.Module):
    def __init__(self, projector_type: str, d_in: int, d_out: int, *, bias: bool = True, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):  # fmt: skip
        depth = projector_depth(projector_type)
        if depth == 0 and d_in != d_out:
            raise ValueError(f"an identity projector needs equal widths, got vision {d_in} and text {d_out}")
        kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linears = nnx.List(
            [Linear(d_in if i == 0 else d_out, d_out, ("embed", "mlp") if i == 0 else ("mlp", "embed"), **kw)
             for i in range(depth)]  # fmt: skip
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_in] -> [..., d_out]."""
        for i, linear in enumerate(self.linears):
            x = linear(gelu(x) if i else x)
        return x
