"""Parameters created, read and restored already sharded: never whole on one device, and per host only
that host's shards."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax import sharding as shd
from llava_jax.checkpoints.params import build_array, host_shards
from llava_jax.config import preset
from llava_jax.model.decoder import Decoder
from llava_jax.model.llava import LlavaModel
from tests.test_model import tiny

AXES = ("data", "fsdp", "tensor")


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)])
def test_7b_parameters_take_an_eighth_per_device(shape):
    """On abstract shapes: per device at most 1/8 of the 7B preset's bytes, plus the 1-D parameters
    (norm scales, biases over an axis the mesh leaves whole) that stay replicated."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: LlavaModel(preset("llava-1.5-7b"), rngs=nnx.Rngs(0))))
    variables = [v for _, v in nnx.to_flat_state(abstract)]
    total = sum(v.size * v.dtype.itemsize for v in variables)
    one_dim = sum(v.size * v.dtype.itemsize for v in variables if len([a for a in v.axes if a != "layers"]) == 1)
    per_device = shd.bytes_per_device(abstract, jax.make_mesh(shape, AXES))
    assert total > 7e9 * 4 and one_dim < 1e-3 * total
    assert total / 8 <= per_device <= total / 8 + one_dim, (per_device, total / 8)


class Layers:
    """A stacked [L, R, C] parameter read one layer at a time; records which layers were read."""

    def __init__(self, shape=(4, 8, 6)):
        self.value = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        self.reads = []

    def __call__(self, i):
        self.reads.append(i)
        return self.value if i is None else self.value[i]


def test_a_host_holds_and_reads_only_its_shards():
    """Layers split over `data` (2) and rows over `fsdp` (4): the first host of two (devices of data
    index 0) reads layers 0-1 only and holds half the tensor, each shard once."""
    layers = Layers()
    mesh = jax.make_mesh((2, 4, 1), AXES)
    sharding = NamedSharding(mesh, PartitionSpec("data", "fsdp", None))
    host0 = [index for device, index in sharding.devices_indices_map(layers.value.shape).items()
             if device in set(mesh.devices[0].flat)]  # fmt: skip
    shards = host_shards(layers.value.shape, np.float32, host0, layers, stacked=True)
    assert sorted(layers.reads) == [0, 1]
    assert len(shards) == 4 and sum(s.nbytes for s in shards.values()) == layers.value.nbytes // 2
    for bounds, shard in shards.items():
        np.testing.assert_array_equal(shard, layers.value[tuple(slice(*b) for b in bounds)])


@pytest.mark.parametrize("spec", [PartitionSpec(None, "fsdp", "tensor"), PartitionSpec(None, None, "tensor")])
def test_build_array_reads_each_layer_once(spec):
    layers = Layers()
    sharding = NamedSharding(jax.make_mesh((2, 2, 2), AXES), spec)
    array = build_array(layers.value.shape, np.float32, sharding, layers, stacked=True)
    assert sorted(layers.reads) == [0, 1, 2, 3]
    assert array.sharding == sharding and not array.sharding.is_fully_replicated
    assert {s.data.shape for s in array.addressable_shards} == {sharding.shard_shape(layers.value.shape)}
    np.testing.assert_array_equal(np.asarray(array), layers.value)
    whole = Layers()
    unstacked = build_array(whole.value.shape, np.float32, sharding, whole, stacked=False)
    assert whole.reads == [None]
    np.testing.assert_array_equal(np.asarray(unstacked), whole.value)


def test_create_sharded_equals_unsharded_creation():
    mesh = jax.make_mesh((1, 4, 2), AXES)
    make = lambda: Decoder(tiny(2).text, rngs=nnx.Rngs(3))  # noqa: E731
    sharded = nnx.state(shd.create_sharded(make, mesh))
    plain = jax.jit(lambda: nnx.state(make()))()  # jitted as well: eager initialisers round differently
    expected = shd.state_shardings(plain, mesh)
    kernel = sharded["layers"]["mlp"]["up_proj"]["kernel"].get_value()
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    for got, want, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
