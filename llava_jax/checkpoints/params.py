"""Maps tensors of a checkpoint file onto the model's parameter tree, one tensor at a time.

A format (llava-hf, original LLaVA, GGUF) describes itself as a list of `Rule`s: which file key (or,
for stacked layers, which key per layer) fills which parameter path, and how the file's array is
turned into ours. `read_params` then checks the file against the rules (missing, unexpected and
mis-shaped tensors are reported by name) and builds each parameter, cast to the target dtype and
placed on its devices before the next one is read. On a mesh a parameter is built shard by shard
(`build_array`): never whole on one device, and on many hosts never whole on one host.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Protocol

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from llava_jax.checkpoints.safetensors_io import CheckpointError

Array = np.ndarray


class TensorSource(Protocol):
    """Tensors by key. A source that renames keys may add `file_key(key) -> str` for messages."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str) -> np.ndarray: ...


def identity(x: Array) -> Array:
    return x


def transpose(x: Array) -> Array:
    """PyTorch Linear weight [out, in] <-> our kernel [in, out]."""
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """Parameter `path` (dotted) comes from file `key`; `{i}` in the key marks a stacked layer index.

    `to_model` turns one file array into our layout, `to_file` does the reverse (for export).
    """

    path: str
    key: str
    to_model: Callable[[Array], Array] = identity
    to_file: Callable[[Array], Array] = identity

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def keys(self, num_layers: int) -> list[str]:
        return [self.key.format(i=i) for i in range(num_layers)] if self.stacked else [self.key]


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def check_coverage(rules: Iterable[Rule], state: nnx.State, source: TensorSource, ignore: Iterable[str] = ()):
    """Raises CheckpointError naming every missing or unexpected tensor (ignoring regexes `ignore`)."""
    rules = list(rules)
    variables = flat_variables(state)
    unmapped = sorted(set(variables) - {r.path for r in rules})
    if unmapped:
        raise CheckpointError(f"internal: no checkpoint rule for parameters {unmapped}")
    expected = {k for r in rules for k in r.keys(variables[r.path].shape[0] if r.stacked else 1)}
    present = set(source.keys())
    skip = [re.compile(p) for p in ignore]
    missing = sorted(expected - present)
    file_key = getattr(source, "file_key", lambda k: k)
    unexpected = sorted(file_key(k) for k in present - expected if not any(p.fullmatch(k) for p in skip))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}"
        )
    if problems:
        raise CheckpointError(
            "checkpoint does not match the model config: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )  # fmt: skip


def _read_one(source: TensorSource, key: str, rule: Rule, shape: tuple[int, ...], dtype) -> Array:
    array = rule.to_model(source.read(key))
    if tuple(array.shape) != tuple(shape):
        name = getattr(source, "file_key", lambda k: k)(key)
        raise CheckpointError(
            f"tensor {name} has shape {tuple(source.shape(key))}, which gives {tuple(array.shape)} for parameter "
            f"{rule.path}; the model config expects {tuple(shape)}"
        )
    return np.asarray(array, dtype=dtype)


def read_params(rules: Iterable[Rule], abstract: nnx.State, source: TensorSource, *, dtype=None, shardings=None,
                ignore: Iterable[str] = (), progress: bool = False,
                quantize: dict | None = None) -> nnx.State:  # fmt: skip
    """Fills an abstract state (from `nnx.eval_shape` + `nnx.split`) with the checkpoint's tensors.

    dtype: the parameter dtype (default: each abstract variable's). shardings: a state of
    NamedShardings (from `llava_jax.sharding.state_shardings`), or None for the default device.
    quantize: {kernel path: llava_jax.quant.QuantSpec}: those kernels become `qvalue` and `scale`
    (the state of `quant.quantize_model`), quantized one tensor at a time on the host, so no float
    copy of them reaches the devices; shardings then is the quantized state's.
    """
    quantize = quantize or {}
    rules = list(rules)
    check_coverage(rules, abstract, source, ignore)
    variables = flat_variables(abstract)
    target = {} if shardings is None else {path_str(p): s for p, s in nnx.to_flat_state(shardings)}
    by_path = {r.path: r for r in rules}
    filled = {}
    total = sum(len(r.keys(variables[r.path].shape[0] if r.stacked else 1)) for r in rules)
    bar = tqdm(total=total, desc="reading tensors", unit="tensor", disable=not progress)
    for path, var in variables.items():
        rule = by_path[path]
        shape, want = var.shape, np.dtype(dtype or var.dtype)
        if path in quantize:
            base = path.rsplit(".", 1)[0]
            keys = rule.keys(shape[0]) if rule.stacked else [rule.key]
            q, scale = _read_quantized(source, keys, rule, shape, quantize[path], want, stacked=rule.stacked)
            bar.update(len(keys))
            for name, value in ((".qvalue", q), (".scale", scale)):  # whole on the host: quantized already
                filled[base + name] = var.replace(build_array(value.shape, value.dtype, target.get(base + name),
                                                              lambda _, value=value: value, stacked=False))
            continue
        keys = rule.keys(shape[0]) if rule.stacked else [rule.key]

        def read(i, rule=rule, keys=keys, shape=shape, want=want):  # layer i, or the whole tensor for None
            bar.update()
            return _read_one(source, keys[i or 0], rule, shape[1:] if rule.stacked else shape, want)

        filled[path] = var.replace(build_array(shape, want, target.get(path), read, stacked=rule.stacked))
    bar.close()
    return nnx.from_flat_state([(tuple(_key(p) for p in path.split(".")), v) for path, v in filled.items()])


def _read_quantized(source, keys, rule: Rule, shape, spec, scale_dtype, *, stacked: bool):
    """(qvalue, scale) host arrays of one kernel (all its layers when stacked): a tensor the file
    stores in `spec`'s format as it is (`source.read_quantized`), any other read and quantized."""
    from llava_jax.quant import quantize_array

    direct = getattr(source, "read_quantized", None)
    layer_shape = shape[1:] if stacked else shape
    parts = []
    for key in keys:
        stored = direct(key, spec) if direct is not None else None
        if stored is not None:  # the file's own integers and scales, in its [out, in] layout
            q, scale = (rule.to_model(a) for a in stored)
            if tuple(q.shape) != tuple(layer_shape):
                _read_one(source, key, rule, layer_shape, np.float32)  # raises the shape error
            parts.append((q, np.asarray(scale, scale_dtype)))
        else:
            parts.append(quantize_array(_read_one(source, key, rule, layer_shape, np.float32), spec, scale_dtype))
    if not stacked:
        return parts[0]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def _key(part: str):
    return int(part) if part.isdigit() else part


def build_array(shape: tuple[int, ...], dtype, sharding, read: Callable[[int | None], Array], *,
                stacked: bool) -> jax.Array:  # fmt: skip
    """A device array of `shape` laid out by `sharding` (None: the default device), built from the file
    one shard at a time: this process holds only its own devices' shards (each once, however many
    devices replicate it) plus the one file tensor being read, and reads only the layers they cover.

    read(i) returns layer i of a stacked parameter ([L, ...] from one file tensor per layer), read(None)
    the whole of an unstacked one. Blocks until the copy is done, so that the host buffers can be freed
    before the next parameter is read.
    """
    if sharding is None:
        value = np.empty(shape, dtype) if stacked else read(None)
        if stacked:
            for i in range(shape[0]):
                value[i] = read(i)
        return jax.device_put(value).block_until_ready()
    shards = host_shards(shape, dtype, sharding.addressable_devices_indices_map(shape).values(), read, stacked=stacked)
    array = jax.make_array_from_callback(shape, sharding, lambda index: shards[_bounds(index, shape)])
    return array.block_until_ready()


def host_shards(shape: tuple[int, ...], dtype, indices, read: Callable[[int | None], Array], *,
                stacked: bool) -> dict[tuple, Array]:  # fmt: skip
    """{bounds: host array} for the distinct shard `indices` (tuples of slices into `shape`), filled from
    `read` as in `build_array`; bounds are ((start, stop), ...) per dimension."""
    bounds = {_bounds(index, shape) for index in indices}
    shards = {b: np.empty(tuple(stop - start for start, stop in b), dtype) for b in bounds}
    if not stacked:
        value = read(None)
        return {b: np.ascontiguousarray(value[tuple(slice(*d) for d in b)]) for b in bounds}
    for i in sorted({i for b in bounds for i in range(*b[0])}):
        layer = read(i)
        for b, shard in shards.items():
            if b[0][0] <= i < b[0][1]:
                shard[i - b[0][0]] = layer[tuple(slice(*d) for d in b[1:])]
    return shards


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def write_params(rules: Iterable[Rule], state: nnx.State, dtype=None) -> Iterable[tuple[str, Array]]:
    """The reverse of read_params: yields (file key, array in the file's layout), one at a time."""
    variables = flat_variables(state)
    for rule in rules:
        value = np.asarray(jax.device_get(variables[rule.path].get_value()))
        if dtype is not None:
            value = value.astype(dtype)
        if rule.stacked:
            for i, key in enumerate(rule.keys(value.shape[0])):
                yield key, np.ascontiguousarray(rule.to_file(value[i]))
        else:
            yield rule.key, np.ascontiguousarray(rule.to_file(value))
