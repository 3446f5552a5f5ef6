"""Small building blocks shared by the vision tower, projector and decoder.

Every parameter carries `axes`: one logical axis name per dimension ("embed", "mlp", "heads",
"kv_heads", "vocab", "layers", ...). `llava_jax.sharding` maps those names to mesh axes.
Kernels are stored [in, out] (the transpose of a PyTorch Linear weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    return nnx.Param(init(rngs.params(), shape, dtype), axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel + bias. kernel: [in, out]; x: [..., in] -> [..., out]."""

    def __init__(self, d_in: int, d_out: int, axes: Axes, *, bias: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):  # fmt: skip
        init = nnx.initializers.normal(stddev=d_in**-0.5)
        self.kernel = param(rngs, init, (d_in, d_out), axes, param_dtype)
        self.bias = nnx.data(param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], param_dtype) if bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32. x: [..., D]."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalised in float32, cast back, then scaled (HF's order). x: [..., D]."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as PyTorch's nn.GELU() and HF's "gelu"."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": jax.nn.silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs):
    """Creates `num_layers` copies of a layer module with parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"})
    def create(rngs: nnx.Rngs):
        return make_layer(rngs)

    return create(rngs)


# Rematerialisation of each scanned layer, by name: what the backward pass keeps from the forward.
REMAT_POLICIES = {
    "none": None,  # keep every activation (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),  # as "dots",
    # held in host memory between the passes
}


def remat_policy(remat: str | bool):
    """The name (or a bool: True = "full") -> (whether to checkpoint, policy)."""
    name = ("full" if remat else "none") if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    return name != "none", REMAT_POLICIES[name]


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, length: int | None = None,
                remat: str | bool = "none"):  # fmt: skip
    """Runs `body(layer, carry, x) -> (carry, y)` over stacked layers with `jax.lax.scan`.

    The layers' state is split once and each step merges one layer's slice back into a module, so the
    traced program holds one layer however deep the stack. `length` runs only the first `length`
    layers; the step indexes the stacked state itself (slicing off the first `length` layers up
    front would copy all their parameters). `remat` names a policy of REMAT_POLICIES.
    """
    graphdef, state = nnx.split(layers)
    if length is None:
        length = jax.tree.leaves(state)[0].shape[0]

    def step(carry, inputs):
        i, x = inputs
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
        return body(nnx.merge(graphdef, layer_state), carry, x)

    checkpoint, policy = remat_policy(remat)
    if checkpoint:  # see REMAT_POLICIES
        step = jax.checkpoint(step, prevent_cse=False, policy=policy)
    return jax.lax.scan(step, carry, (jnp.arange(length), xs), length=length)
