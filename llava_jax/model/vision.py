"""CLIP ViT vision tower (HF `CLIPVisionModel`), returning the hidden states LLaVA selects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import VisionConfig
from llava_jax.model.attention import attend
from llava_jax.model.layers import LayerNorm, Linear, activation, param, scan_layers, stack_layers


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla"):
        d = cfg.hidden_size
        kw = dict(bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.o_proj = Linear(d, d, ("heads", "embed"), **kw)
        self.num_heads, self.head_dim, self.attention = cfg.num_heads, cfg.head_dim, attention

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, P, D] -> [N, P, D]; every patch attends to every patch."""
        n, p, _ = x.shape
        split = lambda y: y.reshape(n, p, self.num_heads, self.head_dim)
        out = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), None, self.head_dim**-0.5,
                     self.attention)  # fmt: skip
        return self.o_proj(out.reshape(n, p, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla"):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nnx.Module):
    """CLIP ViT: patch conv, class and position embeddings, pre-layernorm, stacked encoder layers.

    `post_norm` is part of the checkpoint but LLaVA reads hidden states before it. `attention` names the
    kernel (llava_jax.model.attention).
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "xla"):  # fmt: skip
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.cfg, self.dtype = cfg, dtype
        self.patch_embed = param(rngs, nnx.initializers.lecun_normal(), (p, p, c, d),
                                 (None, None, None, "embed"), param_dtype)  # fmt: skip
        self.class_embed = param(rngs, nnx.initializers.normal(d**-0.5), (d,), ("embed",), param_dtype)
        self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (cfg.num_patches + 1, d), (None, "embed"), param_dtype)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.layers = stack_layers(lambda r: VisionLayer(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype,
                                                         attention=attention), cfg.num_layers, rngs)  # fmt: skip
        self.post_norm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [N, C, H, W] (HF layout) -> hidden state 0: [N, 1 + P, D]."""
        n, c, h, w = pixel_values.shape
        p = self.cfg.patch_size
        if (h, w) != (self.cfg.image_size, self.cfg.image_size) or c != self.cfg.num_channels:
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape} do not fit the vision tower: expected "
                f"[N, {self.cfg.num_channels}, {self.cfg.image_size}, {self.cfg.image_size}]"
            )
        x = pixel_values.astype(self.dtype).reshape(n, c, h // p, p, w // p, p)
        patches = jnp.einsum("nchpwq,pqcd->nhwd", x, self.patch_embed[...].astype(self.dtype))
        patches = patches.reshape(n, -1, self.cfg.hidden_size)
        cls = jnp.broadcast_to(self.class_embed[...].astype(self.dtype), (n, 1, self.cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.pos_embed[...].astype(self.dtype)
        return self.pre_norm(x)

    def __call__(self, pixel_values: jax.Array, layers: tuple[int, ...]) -> list[jax.Array]:
        """Hidden states at the given HF indices (0 = embeddings, i = after layer i).

        pixel_values: [N, C, H, W] -> one [N, 1 + P, D] array per index. Layers past the deepest
        requested index are not run.
        """
        x = self.embed(pixel_values)
        deepest = max(layers)
        if deepest == 0:
            return [x for _ in layers]
        collect = len(set(layers) - {0, deepest}) > 0
        x_last, ys = scan_layers(self.layers, lambda layer, h, _: (layer(h), h if collect else None),
                                 x, length=deepest)  # fmt: skip
        states = {0: x, deepest: x_last}
        if collect:  # ys[i] is the input of layer i, i.e. hidden state i
            states.update({i: ys[i] for i in layers if 0 < i < deepest})
        return [states[i] for i in layers]
