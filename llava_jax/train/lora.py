"""LoRA adapters on the Linear layers of a LlavaModel, as peft's LoRA computes them.

    y = x @ kernel + bias + scale * dropout(x) @ lora_a @ lora_b,    scale = alpha / rank

kernel: [in, out] (frozen in a LoRA run); lora_a: [in, r], kaiming-uniform as peft's `lora_A`
(U(-1/sqrt(in), 1/sqrt(in))); lora_b: [r, out], zeros, so a fresh adapter leaves the model unchanged.
Layers stacked on a leading 'layers' axis (the decoder and vision layers, see `model/layers.py
stack_layers`) get stacked adapters: lora_a [L, in, r], lora_b [L, r, out] with axes metadata
("layers", <kernel's in axis>, None) and ("layers", None, <kernel's out axis>), so `scan_layers` slices
them with the kernels and `llava_jax.sharding.state_shardings` lays them out by the same table.

Parameter paths: the kernel and bias keep their paths (`decoder.layers.attn.q_proj.kernel`), the
adapters sit beside them (`decoder.layers.attn.q_proj.lora_a`), so checkpoint rules for the base
model keep working and `LORA_PARAMS` (a regex over "/"-joined parameter paths, as the optimizer's
groups match them) selects the adapters.

Dropout (peft's `lora_dropout`, on the adapter's input only) is off unless a key is given. The train
step turns it on inside its jitted function, after merging the model:

    set_dropout(model, jax.random.fold_in(jax.random.fold_in(seed_key, step), micro_batch))

The mask then depends only on (seed, step, micro-batch), never on an RNG state carried between steps,
so a resumed run draws the same masks as an uninterrupted one. Each LoRA module (and each layer of a
stack) folds in its own index, so no two draw the same mask. `set_dropout(model, None)` turns it off
again (evaluation, export). The key lives in a `LoraDropoutKey` variable (not a Param: never trained,
and it may be left out of checkpoints: `nnx.split(model, nnx.Param, ...)`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.errors import ConfigError
from llava_jax.model.layers import Linear

# Every linear of the language model but lm_head: LLaVA's LoRA recipe (`find_all_linear_names` in
# the original train.py leaves out mm_projector, vision_tower and lm_head). Matched with
# re.fullmatch against module paths joined by "/" as the optimizer's parameter paths are
# ("decoder/layers/attn/q_proj"; the layer index of stacked layers is not in the path).
DEFAULT_TARGETS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
# The adapter parameters among parameter paths (for the optimizer's trainable groups).
LORA_PARAMS = r".*/lora_(a|b)"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What a LoRA run was configured with; stored beside its checkpoints and written to adapter_config.json."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSettings":
        """From to_dict() or a config's lora section (other keys, e.g. its learning rate, are ignored;
        `target` is read as `targets`)."""
        d = dict(d)
        if "target" in d and "targets" not in d:
            d["targets"] = d["target"]
        if not d.get("targets"):
            d.pop("targets", None)  # empty: the default
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class LoraDropoutKey(nnx.Variable):
    """Raw uint32 key data [*stack, 2] for a LoRA module's dropout; not a parameter."""


class LoraLinear(nnx.Module):
    """A Linear with a LoRA adapter. Built from an existing Linear by `apply_lora` (weights shared).

    For a stacked Linear (kernel [L, in, out]) the adapters are stacked too; called on one layer's
    slice (inside `scan_layers`) every array has lost its leading axis.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs):
        kernel = base.kernel
        axes = kernel.get_metadata().get("axes") or (None,) * kernel.ndim
        stack, (d_in, d_out) = kernel.shape[:-2], kernel.shape[-2:]
        in_axis, out_axis = axes[-2], axes[-1]
        self.kernel = kernel
        self.bias = base.bias
        self.dtype = base.dtype
        bound = d_in**-0.5  # peft: kaiming_uniform_(lora_A.weight, a=sqrt(5)) over fan_in = in
        a = jax.random.uniform(rngs.params(), (*stack, d_in, rank), kernel.dtype, -bound, bound)
        self.lora_a = nnx.Param(a, axes=(*axes[:-2], in_axis, None))
        self.lora_b = nnx.Param(jnp.zeros((*stack, rank, d_out), kernel.dtype), axes=(*axes[:-2], None, out_axis))
        self.dropout_key = LoraDropoutKey(jnp.zeros((*stack, 2), jnp.uint32), axes=(*axes[:-2], None))
        self.scale = alpha / rank
        self.dropout_rate = float(dropout)
        self.dropout_on = False

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        kernel = self.kernel[...]
        if kernel.ndim != 2:
            raise ValueError("a stacked LoraLinear runs one layer at a time (through scan_layers)")
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        h = x.astype(self.dtype)
        if self.dropout_on and self.dropout_rate > 0.0:
            key = jax.random.wrap_key_data(self.dropout_key[...], impl="threefry2x32")
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0).astype(self.dtype)
        delta = jnp.dot(jnp.dot(h, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
        return y + (self.scale * delta).astype(self.dtype)

    def merged_kernel(self) -> jax.Array:
        """kernel + scale * lora_a @ lora_b, computed in float32, in the kernel's dtype. [*stack, in, out]."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
        return (self.kernel[...].astype(jnp.float32) + self.scale * delta).astype(self.kernel.dtype)


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _set_child(parent, name, child) -> None:
    if isinstance(name, int):
        parent[name] = child
    else:
        setattr(parent, name, child)


def _find(model: nnx.Module, cls) -> list[tuple[tuple, nnx.Module]]:
    return [(path, m) for path, m in nnx.iter_modules(model) if type(m) is cls and path]


def target_paths(model: nnx.Module, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Paths ("/"-joined) of the Linear modules that `targets` (re.fullmatch) selects."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ConfigError(f"lora targets {targets!r} is not a valid regular expression: {e}") from e
    return [_path(p) for p, _ in _find(model, Linear) if pattern.fullmatch(_path(p))]


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: str | None = DEFAULT_TARGETS,
               rngs: nnx.Rngs) -> nnx.Module:  # fmt: skip
    """Replaces, in place, every Linear whose module path fully matches `targets` by a LoraLinear.

    targets: a regex (re.fullmatch) over module paths such as `decoder/layers/attn/q_proj`; empty or
    None means DEFAULT_TARGETS. Returns the model. Raises ConfigError for a bad rank, dropout, or a
    regex that selects nothing.
    """
    targets = targets or DEFAULT_TARGETS
    if rank <= 0:
        raise ConfigError(f"lora rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout}")
    chosen = set(target_paths(model, targets))
    if not chosen:
        known = ", ".join(_path(p) for p, _ in _find(model, Linear))
        raise ConfigError(f"lora targets {targets!r} match no Linear module; the model has: {known}")
    for path, module in _find(model, Linear):
        if _path(path) in chosen:
            parent = _module_at(model, path[:-1])
            _set_child(parent, path[-1], LoraLinear(module, rank, alpha, dropout, rngs=rngs))
    return model


def _module_at(model: nnx.Module, path: tuple):
    node = model
    for name in path:
        node = node[name] if isinstance(name, int) else getattr(node, name)
    return node


def lora_modules(model: nnx.Module) -> list[tuple[str, LoraLinear]]:
    """(module path "/"-joined, module) of every LoraLinear, in a stable order."""
    return [(_path(p), m) for p, m in _find(model, LoraLinear)]


def set_dropout(model: nnx.Module, key: jax.Array | None) -> None:
    """Turns LoRA dropout on with `key` (a typed or raw PRNG key), or off with None. In place."""
    for index, (_, module) in enumerate(lora_modules(model)):
        module.dropout_on = key is not None
        if key is None:
            continue
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key, impl="threefry2x32")
        stack = module.dropout_key.shape[:-1]
        keys = jax.random.split(jax.random.fold_in(key, index), int(np.prod(stack))).reshape(stack)
        # a new Variable rather than an update: the old one may belong to an outer trace (a state merged
        # from outside the jitted step), which nnx refuses to mutate
        axes = module.dropout_key.get_metadata().get("axes")
        module.dropout_key = LoraDropoutKey(jax.random.key_data(keys).reshape(*stack, 2), axes=axes)


ADAPTER_NAMES = ("lora_a", "lora_b", "dropout_key")


def base_state(model: nnx.Module) -> nnx.State:
    """The model's state without the adapters: the base model's parameter tree (kernels unmerged)."""
    return nnx.state(model, lambda path, _: not (path and path[-1] in ADAPTER_NAMES))


def has_lora(state: nnx.State) -> bool:
    return any(path[-1] in ADAPTER_NAMES for path, _ in nnx.to_flat_state(state))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (kernel + scale * lora_a @ lora_b) and puts a plain
    Linear back, in place: the model then has the base model's parameter tree. Returns the model."""
    for path, module in _find(model, LoraLinear):
        kernel = module.kernel
        merged = kernel.replace(module.merged_kernel())
        d_in, d_out = kernel.shape[-2:]
        plain = nnx.eval_shape(lambda: Linear(d_in, d_out, (None, None), bias=module.bias is not None,
                                              rngs=nnx.Rngs(0), dtype=module.dtype))  # fmt: skip
        plain.kernel = merged
        plain.bias = nnx.data(module.bias)
        _set_child(_module_at(model, path[:-1]), path[-1], plain)
    return model


def merge_lora_params(params: dict, settings: LoraSettings | dict) -> dict:
    """The same fold on a nested dict of arrays (`nnx.to_pure_dict(state)`): every dict holding
    `kernel`, `lora_a`, `lora_b` gets the merged kernel and loses the adapters (and `dropout_key`).
    settings: LoraSettings or its dict. Returns a new dict; the input is not changed."""
    if isinstance(settings, dict):
        settings = LoraSettings.from_dict(settings)

    def fold(node):
        if not isinstance(node, dict):
            return node
        node = {k: fold(v) for k, v in node.items()}
        if "lora_a" in node and "lora_b" in node:
            a, b = jnp.asarray(node.pop("lora_a"), jnp.float32), jnp.asarray(node.pop("lora_b"), jnp.float32)
            node.pop("dropout_key", None)
            kernel = node["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
            node["kernel"] = (jnp.asarray(kernel, jnp.float32) + settings.scale * delta).astype(kernel.dtype)
        return node

    return fold(params)
