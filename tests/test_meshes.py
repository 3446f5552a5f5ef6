"""Every mesh works: any (data, fsdp, tensor) sizes, built by `jax.make_mesh` (Explicit axes, JAX's
default, or Auto) or by `llava_jax.sharding.make_mesh`, give the logits and greedy tokens of one device."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import llava_jax
from llava_jax import sharding as shd
from llava_jax.errors import ConfigError
from tests import reference as R

AXES = ("data", "fsdp", "tensor")
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
BUILDERS = {
    "jax_explicit": lambda shape: jax.make_mesh(shape, AXES),
    "jax_auto": lambda shape: jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3),
    "llava_jax": lambda shape: shd.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))]),
}
NEW = 4


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """A tiny llava-hf checkpoint, a batch of 8 ragged prompts with images (left-padded for logits),
    and the single-device logits and greedy tokens."""
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 CPU devices"
    directory = R.save(R.build_llava(R.llava_hf_config(), seed=2, scale=0.5), str(tmp_path_factory.mktemp("mesh")))
    rng = np.random.default_rng(0)
    pipe = llava_jax.load(directory, dtype="float32")
    n = pipe.config.tokens_per_tile
    rows = [list(R.sequence(rng, R.IMAGE_TOKEN, [n])[: 10 + n + i % 4]) for i in range(8)]
    width = max(map(len, rows))
    ids = np.zeros((8, width), np.int32)
    mask = np.zeros((8, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    pixels = rng.standard_normal((8, 3, 28, 28)).astype(np.float32)
    expected = (pipe.logits(ids, pixels, attention_mask=mask), pipe.generate(rows, pixels, max_new_tokens=NEW, eos_ids=()))
    assert len({tuple(r) for r in expected[1]}) > 4  # the rows differ: a real comparison
    return directory, rows, ids, mask, pixels, expected


def check_mesh(one_device, mesh, layouts=("copy", "scanned")):
    directory, rows, ids, mask, pixels, (logits, tokens) = one_device
    shape = tuple(mesh.devices.shape)
    for layout in layouts:
        pipe = llava_jax.load(directory, dtype="float32", mesh=mesh, generation_layout=layout)
        kernel = pipe._state["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
        assert kernel.sharding.mesh.devices.shape == shape
        if layout == layouts[0]:
            np.testing.assert_allclose(pipe.logits(ids, pixels, attention_mask=mask), logits, atol=2e-5, rtol=0)
        assert pipe.generate(rows, pixels, max_new_tokens=NEW, eos_ids=()) == tokens, layout


SHAPE_IDS = lambda s: "x".join(map(str, s))  # noqa: E731


@pytest.mark.parametrize("shape", MESHES, ids=SHAPE_IDS)
def test_explicit_mesh_gives_the_logits_and_tokens_of_one_device(one_device, shape):
    """jax.make_mesh's default (Explicit axes) once failed with "Contracting dimensions are sharded".
    Both generation layouts where parameters are split over fsdp and tensor; the decode copy elsewhere."""
    layouts = ("copy", "scanned") if shape in ((1, 8, 1), (1, 4, 2)) else ("copy",)
    check_mesh(one_device, BUILDERS["jax_explicit"](shape), layouts)


@pytest.mark.parametrize("shape", MESHES, ids=SHAPE_IDS)
def test_the_three_builders_run_one_program(shape):
    """Every builder's mesh is used through the same Auto view: the same devices, names and axis types,
    so the same placement and the same compiled program as the Explicit mesh tested above."""
    views = {name: shd.auto_view(build(shape)) for name, build in BUILDERS.items()}
    assert len(set(views.values())) == 1, views
    assert views["jax_explicit"].axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize(("builder", "shape"), [("jax_auto", (1, 4, 2)), ("llava_jax", (8, 1, 1))])
def test_auto_meshes_give_the_logits_and_tokens_of_one_device(one_device, builder, shape):
    check_mesh(one_device, BUILDERS[builder](shape), layouts=("copy",))


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=SHAPE_IDS)
@pytest.mark.parametrize("builder", ["jax_auto", "llava_jax"])
def test_every_builder_and_mesh(one_device, builder, shape):
    """The whole matrix (the default run covers it through test_the_three_builders_run_one_program)."""
    check_mesh(one_device, BUILDERS[builder](shape))


def test_auto_view_keeps_devices_and_names():
    explicit = jax.make_mesh((1, 4, 2), AXES)
    assert explicit.axis_types == (AxisType.Explicit,) * 3  # JAX's default: what the view is for
    view = shd.auto_view(explicit)
    assert view.axis_types == (AxisType.Auto,) * 3
    assert view.axis_names == AXES and (view.devices == explicit.devices).all()
    assert shd.auto_view(view) is view


def test_unknown_mesh_axis_is_a_config_error():
    with pytest.raises(ConfigError, match=r"mesh axes \['model'\] are not known"):
        shd.auto_view(jax.make_mesh((2, 4), ("data", "model")))
    with pytest.raises(ConfigError, match="does not use exactly"):
        shd.make_mesh(data=3, fsdp=2)
