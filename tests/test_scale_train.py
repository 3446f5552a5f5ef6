"""Training at scale on 8 forced CPU devices: one step on any mesh equals one device, and a checkpoint
written on one mesh continues on another with the same loss."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from llava_jax import sharding as shd
from llava_jax.model.llava import LlavaModel
from llava_jax.train import microbatch
from llava_jax.train.optimizer import Groups, make_optimizer, merge_params, split_params
from llava_jax.train.state import TrainState
from llava_jax.train.step import make_train_step
from tests.test_train_step import CONFIG, make_batch

AXES = ("data", "fsdp", "tensor")
GROUPS = Groups(((r"projector/.*", 1e-2), (r"decoder/.*", 1e-2)))


def init_params() -> dict:
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(LlavaModel(CONFIG, rngs=nnx.Rngs(0)))))()


class Trainer:
    """The trainer's step on `mesh` (None: one device), the train state laid out as the trainer's helpers
    prescribe: parameters by `state_shardings`, optimizer moments as their parameters."""

    def __init__(self, mesh):
        self.mesh = None if mesh is None else shd.auto_view(mesh)
        self.graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlavaModel(CONFIG, rngs=nnx.Rngs(0))))
        self.shardings = None if mesh is None else nnx.to_pure_dict(shd.state_shardings(abstract, mesh))
        trainable, _ = split_params(nnx.to_pure_dict(abstract), GROUPS)
        # eps 1e-3: Adam's first update g / (|g| + eps) is then a smooth function of the gradient; with
        # 1e-8 it jumps for gradients near 1e-8, where another reduction order moves single elements.
        self.optimizer, _ = make_optimizer(trainable, GROUPS, total_steps=10, warmup_ratio=0.0, weight_decay=0.1,
                                           clip_norm=1.0, eps=1e-3)  # fmt: skip
        self.step = make_train_step(self.graphdef, self.optimizer, donate=False)

    def place(self, params: dict):
        if self.mesh is not None:
            params = jax.tree.map(jax.device_put, params, self.shardings)
        trainable, frozen = split_params(params, GROUPS)
        create = lambda t: TrainState.create(t, self.optimizer, 0)  # noqa: E731
        if self.mesh is None:
            return jax.jit(create)(trainable), frozen
        abstract = jax.eval_shape(create, trainable)
        out = abstract.replace(trainable=jax.tree.map(lambda a: a.sharding, trainable),
                               opt_state=shd.optimizer_state_shardings(abstract.opt_state, trainable, self.mesh),
                               **{k: jax.sharding.NamedSharding(self.mesh, jax.P())
                                  for k in ("rng", "step", "updates", "nonfinite", "empty")})  # fmt: skip
        with shd.use_mesh(self.mesh):
            return jax.jit(create, out_shardings=out)(trainable), frozen

    def batch(self, host: dict) -> dict:
        micro = microbatch.split(host, 1, CONFIG)
        if self.mesh is None:
            return micro
        spec = lambda x: shd.logical_to_spec((None, "batch") + (None,) * (x.ndim - 2), self.mesh, x.shape)  # noqa: E731
        return {k: jax.device_put(v, jax.sharding.NamedSharding(self.mesh, spec(v))) for k, v in micro.items()}

    def run(self, state, frozen, host: dict):
        with shd.use_mesh(self.mesh):
            return self.step(state, frozen, self.batch(host))


@pytest.fixture(scope="module")
def one_device():
    trainer = Trainer(None)
    state, frozen = trainer.place(init_params())
    state, metrics = trainer.run(state, frozen, make_batch(rows=8, seed=1))
    return float(metrics["loss"]), jax.device_get(merge_params(state.trainable, frozen))


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_one_step_on_a_mesh_equals_one_device(one_device, shape):
    """jax.make_mesh's Explicit axes here; test_meshes.py shows every builder gives the same Auto view."""
    loss, params = one_device
    mesh = jax.make_mesh(shape, AXES)
    assert mesh.axis_types == (AxisType.Explicit,) * 3
    trainer = Trainer(mesh)
    state, frozen = trainer.place(init_params())
    moment = state.opt_state[1].inner_states["1"].inner_state[0].mu["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert moment.sharding.is_equivalent_to(trainer.shardings["decoder"]["layers"]["mlp"]["up_proj"]["kernel"], 3)
    state, metrics = trainer.run(state, frozen, make_batch(rows=8, seed=1))
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    # Within 1e-5 of each tensor's largest value (single small elements differ more in their own terms).
    got = jax.device_get(merge_params(state.trainable, frozen))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0, err_msg=jax.tree_util.keystr(path))


def test_make_mesh_builder_trains_alike(one_device):
    loss, _ = one_device
    trainer = Trainer(shd.make_mesh(2, 2, 2))
    state, frozen = trainer.place(init_params())
    _, metrics = trainer.run(state, frozen, make_batch(rows=8, seed=1))
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)


def test_checkpoint_from_one_mesh_continues_on_another(tmp_path):
    """Saved on 1x4x1 after one step, restored onto 2x1x2: the next step's loss is the one 1x4x1 gives."""
    from llava_jax.train.checkpointing import StageCheckpoints

    first = Trainer(jax.make_mesh((1, 4, 1), AXES, devices=jax.devices()[:4]))
    state, frozen = first.place(init_params())
    state, _ = first.run(state, frozen, make_batch(rows=8, seed=1))
    train_item = {k: getattr(state, k) for k in ("opt_state", "rng", "step", "updates", "nonfinite", "empty")}
    checkpoints = StageCheckpoints(str(tmp_path / "ckpt"), asynchronous=False)
    checkpoints.save(1, merge_params(state.trainable, frozen), train_item, None)
    checkpoints.close()
    _, expected = first.run(state, frozen, make_batch(rows=8, seed=2))

    second = Trainer(jax.make_mesh((2, 1, 2), AXES, devices=jax.devices()[4:]))
    fresh, fresh_frozen = second.place(init_params())  # only for the target layout
    abstract_params = merge_params(fresh.trainable, fresh_frozen)
    abstract_train = {k: getattr(fresh, k) for k in train_item}
    restored = StageCheckpoints(str(tmp_path / "ckpt"), asynchronous=False)
    params, train = restored.restore(1, abstract_params, abstract_train)
    restored.close()
    kernel = params["decoder"]["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding.is_equivalent_to(second.shardings["decoder"]["layers"]["attn"]["q_proj"]["kernel"], 3)
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[4:]}
    trainable, frozen = split_params(params, GROUPS)
    _, metrics = second.run(TrainState(trainable=trainable, **train), frozen, make_batch(rows=8, seed=2))
    assert int(train["step"]) == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)
