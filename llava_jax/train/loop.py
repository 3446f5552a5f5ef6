"""The training loop: the run's stages in order, each resumable from its latest checkpoint.

`train(config, workdir)` runs every stage not yet done. A stage: build its start model (or restore
its checkpoint), the data (LlavaDataset), the optimizer over its trainable groups, then steps until
its epochs or `max_steps` end, logging every `log_every` steps and saving every `checkpoint_every`
steps and at its end. SIGTERM saves a checkpoint and exits cleanly (`Preempted`); running the same
command again resumes and logs the same losses as a run never stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax import sharding as shd
from llava_jax.data.pipeline import DataConfig, LlavaDataset
from llava_jax.errors import ConfigError, DataError
from llava_jax.train import flops, global_batch, hosts, metrics, microbatch, run_dir, sources, stages
from llava_jax.train.checkpointing import StageCheckpoints
from llava_jax.train.optimizer import Groups, make_optimizer, merge_params, split_params
from llava_jax.train.state import TrainState
from llava_jax.train.step import LOSS_CHUNK, make_train_step

# Fields that do not change what a run computes: they may differ when a run resumes.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "keep_checkpoints", "progress", "mfu_peak_tflops")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved at `step`."""


class NonFiniteLoss(RuntimeError):
    """Several steps in a row had a non-finite loss or gradient."""


class Stopper:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def check_workdir(workdir: str, config_dict: dict, stage_names: tuple[str, ...]) -> None:
    """Writes WORKDIR/run.json, or checks that the run already there has this config (ConfigError)."""
    path = os.path.join(workdir, run_dir.RUN_FILE)
    if os.path.isfile(path):
        old = run_dir.read_json(path).get("config", {})
        a = {k: v for k, v in flatten(old).items() if k.split(".")[0] not in RESUMABLE_CHANGES}
        b = {k: v for k, v in flatten(json.loads(json.dumps(config_dict))).items()
             if k.split(".")[0] not in RESUMABLE_CHANGES}  # fmt: skip
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            shown = ", ".join(f"{k} ({a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} now)" for k in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise ConfigError(f"{workdir} holds a run of another config: {shown}{more}; use a new --workdir, or "
                              "the config of that run to resume it")  # fmt: skip
        return
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        run_dir.write_json(path, {"format": "llava_jax_run", "version": 1, "config": config_dict, "stages": list(stage_names)})


def build_mesh(cfg):
    try:
        return shd.make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor))
    except ValueError as e:
        raise ConfigError(f"mesh ({cfg.mesh.data}, {cfg.mesh.fsdp}, {cfg.mesh.tensor}): {e}; set mesh.data, "
                          "mesh.fsdp, mesh.tensor so that their product is the device count (-1 takes the rest)") from None  # fmt: skip


def place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def param_shardings(graphdef_abstract_state, mesh) -> dict:
    return nnx.to_pure_dict(shd.state_shardings(graphdef_abstract_state, mesh))


class StageRun:
    """One stage of a run, from its start (or its latest checkpoint) to its end."""

    def __init__(self, cfg, name: str, index: int, workdir: str, mesh, stopper: Stopper, writer, previous: str | None):
        self.cfg, self.name, self.index, self.workdir = cfg, name, index, workdir
        self.stage_cfg = cfg.stages[name]
        self.mesh, self.stopper, self.writer = mesh, stopper, writer
        self.directory = run_dir.stage_dir(workdir, name)
        self.previous = previous
        self.seed = int(cfg.seed) + index

    @property
    def done_path(self) -> str:
        return os.path.join(self.directory, run_dir.DONE_FILE)

    def run(self) -> dict:
        cfg, stage_cfg = self.cfg, self.stage_cfg
        if os.path.isfile(self.done_path):
            return run_dir.read_json(self.done_path)
        stages.data_files(stage_cfg, self.name)  # a missing file stops the run before any model is built
        compute, param_dtype = str(cfg.get("compute_dtype", "float32")), str(cfg.get("param_dtype", "float32"))
        checkpoints = StageCheckpoints(run_dir.checkpoints_dir(self.directory), int(cfg.get("keep_checkpoints", 3)))
        latest = checkpoints.latest_step()
        lora = stage_cfg.get("lora", None)
        lora = lora.to_dict() if lora is not None and int(lora.get("rank", 0)) > 0 else None
        if latest is None:
            start = sources.start_of(self.name, stage_cfg, seed=self.seed, param_dtype=param_dtype,
                                     previous_stage_dir=self.previous)  # fmt: skip
            aspect = str(stage_cfg.data.get("image_aspect_ratio", ""))
            config = start.config.replace(image_aspect_ratio=aspect) if aspect else start.config
            template = str(stage_cfg.data.get("template", "")) or start.template
            run_dir.write_stage(self.directory, config, template, lora, start.side_dir)
            hosts.barrier(f"stage {self.name} written")  # process 0 wrote it; every process reads it next
            params = start.params
        else:
            config, params = run_dir.read_stage(self.directory).config, None
        info = run_dir.read_stage(self.directory)
        model_config = config.replace(dtype=compute, param_dtype=param_dtype)
        remat = str(cfg.get("remat", "none"))  # a policy name of llava_jax.model.layers.REMAT_POLICIES
        tokenizer = self._tokenizer(info.side_dir)
        self.pad_id = tokenizer.pad_id
        dataset, geometry, total = self._data(model_config, tokenizer)

        graphdef, abstract = self._abstract(model_config, lora, remat)
        shardings = param_shardings(abstract, self.mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nnx.to_pure_dict(abstract), shardings)  # fmt: skip
        groups = Groups.from_config(stage_cfg.trainable, f"stages.{self.name}.trainable")
        if lora:  # the adapters train at lora.lr unless a trainable pattern already names them
            from llava_jax.train.lora import LORA_PARAMS

            groups = Groups(groups.patterns + ((LORA_PARAMS, float(lora["lr"])),))
        trainable, frozen = split_params(abstract, groups)
        if not jax.tree.leaves(trainable):
            raise ConfigError(f"stages.{self.name}.trainable matches no parameter; patterns match whole paths such "
                              "as 'projector/.*' or 'decoder/layers/.*'")  # fmt: skip
        optimizer, schedules = make_optimizer(
            trainable, groups, total_steps=total, warmup_ratio=float(stage_cfg.get("warmup_ratio", 0.0)),
            weight_decay=float(stage_cfg.get("weight_decay", 0.0)), clip_norm=float(stage_cfg.get("clip_norm", 1.0)),
        )  # fmt: skip
        create = jax.jit(lambda t: TrainState.create(t, optimizer, self.seed),
                         out_shardings=self._state_shardings(optimizer, trainable))  # fmt: skip
        iterator = iter(dataset)
        if latest is None:
            if lora:
                params = self._with_lora(graphdef, model_config, params, lora)
            trainable, frozen = split_params(place(params, shardings), groups)
            state = create(trainable)
        else:
            # the state's layout as create() would place it, so that restored arrays sit where the step expects
            layout = create.lower(trainable).compile().output_shardings
            abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                          jax.eval_shape(create, trainable), layout)  # fmt: skip
            params, train_item = checkpoints.restore(latest, abstract, self._train_item(abstract_state), iterator)
            trainable, frozen = split_params(params, groups)
            state = TrainState(trainable=trainable, **train_item)
            order = list(stages.order(cfg))
            if self.writer.enabled:  # process 0's file
                metrics.truncate(self.writer.path, lambda r: order.index(r["stage"]) < self.index or
                                 (r["stage"] == self.name and r["step"] <= latest))  # fmt: skip
        step_fn = make_train_step(graphdef, optimizer, loss_chunk=int(cfg.get("loss_chunk", LOSS_CHUNK)))
        fractions = flops.trainable_fractions(trainable, frozen)
        try:
            return self._loop(state, frozen, iterator, step_fn, checkpoints, model_config, geometry, total, schedules,
                              groups, fractions)  # fmt: skip
        finally:
            checkpoints.close()

    def _state_shardings(self, optimizer, trainable) -> TrainState:
        """Where a fresh train state lives: trainable parameters as given, optimizer moments laid out as
        their parameters (left to jit, freshly created moments would be replicated on every device, which
        undoes fsdp for the largest part of the state), counters and RNG replicated."""
        abstract = jax.eval_shape(lambda t: TrainState.create(t, optimizer, self.seed), trainable)
        replicated = jax.sharding.NamedSharding(shd.auto_view(self.mesh), jax.P())
        return abstract.replace(trainable=jax.tree.map(lambda a: a.sharding, trainable),
                                opt_state=shd.optimizer_state_shardings(abstract.opt_state, trainable, self.mesh),
                                **{k: replicated for k in ("rng", "step", "updates", "nonfinite", "empty")})  # fmt: skip

    def _abstract(self, model_config, lora, remat):
        """(graphdef, abstract nnx state) of the stage's model, LoRA adapters included."""
        from llava_jax.model.llava import LlavaModel

        def build():
            model = LlavaModel(model_config, rngs=nnx.Rngs(self.seed), remat=remat)
            return run_dir.add_lora(model, lora, self.seed + 1) if lora else model

        return nnx.split(nnx.eval_shape(build))

    def _with_lora(self, graphdef, model_config, params: dict, lora: dict) -> dict:
        """The start parameters with fresh LoRA adapters added (H3's apply_lora on the concrete model)."""
        from llava_jax.model.llava import LlavaModel

        model = nnx.merge(nnx.split(nnx.eval_shape(lambda: LlavaModel(model_config, rngs=nnx.Rngs(0))))[0], params)
        return nnx.to_pure_dict(nnx.state(run_dir.add_lora(model, lora, self.seed + 1)))

    def _train_item(self, state: TrainState) -> dict:
        return {"opt_state": state.opt_state, "rng": state.rng, "step": state.step, "updates": state.updates,
                "nonfinite": state.nonfinite, "empty": state.empty}  # fmt: skip

    def _tokenizer(self, side_dir: str):
        from llava_jax.data.tokenizer import load_tokenizer

        try:
            return load_tokenizer(side_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"stage {self.name}: no usable tokenizer in {side_dir} ({e}); start from a model "
                              "with tokenizer files (init.tokenizer for 'scratch')") from None  # fmt: skip

    def _data(self, model_config, tokenizer):
        cfg, stage_cfg = self.cfg, self.stage_cfg
        data = stage_cfg.data
        files = stages.data_files(stage_cfg, self.name)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        geometry = stages.batch_geometry(stage_cfg, self.name, dp, jax.process_count())
        try:
            config = DataConfig(
                data_path=files, image_folder=str(data.get("image_folder", "")), template=str(data.template),
                batch_size=geometry.host_batch, max_length=int(data.max_length),
                group_by_modality_length=bool(data.get("group_by_modality_length", False)), seed=self.seed,
                num_epochs=int(stage_cfg.epochs), drop_remainder=True, num_workers=int(data.get("num_workers", 0)),
                max_images_per_example=int(data.get("max_images_per_example", 1)),
                length_buckets=tuple(int(b) for b in data.get("length_buckets", ()) or ()) or None,
                packing=str(data.get("packing", "") or "") or None, examples_per_row=int(data.get("examples_per_row", 4)),
            )  # fmt: skip
            dataset = LlavaDataset(config, tokenizer=tokenizer, model_config=model_config)
        except ValueError as e:
            raise DataError(f"stages.{self.name}.data: {e}") from None
        total = dataset.batches_per_epoch * int(stage_cfg.epochs)
        max_steps = int(cfg.max_steps)
        if max_steps != stages.NO_CAP:
            total = min(total, max_steps)
        return dataset, geometry, total

    def _loop(self, state, frozen, iterator, step_fn, checkpoints, model_config, geometry, total, schedules, groups,
              fractions) -> dict:  # fmt: skip
        cfg = self.cfg
        log_every, ckpt_every = max(int(cfg.log_every), 1), max(int(cfg.checkpoint_every), 1)
        max_bad = int(cfg.get("max_nonfinite_in_a_row", 3))
        peak = float(cfg.get("mfu_peak_tflops", 0.0)) * 1e12 * jax.device_count()
        step = int(state.step)
        show = bool(cfg.get("progress", True)) and jax.process_index() == 0
        bar = metrics.progress(total, step, self.name, enabled=show)
        bad_in_a_row = 0
        window = {"tokens": 0, "flops": 0.0, "time": 0.0, "steps": 0}
        first_group = min(schedules)
        updates = int(state.updates)  # applied updates before this step: the schedules' position
        last_saved = checkpoints.latest_step()

        def save(at):
            nonlocal last_saved
            checkpoints.save(at, merge_params(state.trainable, frozen), self._train_item(state), iterator)
            last_saved = at

        with shd.use_mesh(self.mesh):
            while step < total:
                t0 = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                batch = global_batch.agree_length(batch, self.pad_id)
                micro = microbatch.split(batch, geometry.accumulation, model_config)
                step_flops = flops.step_flops(model_config, batch["attention_mask"].sum(axis=1),
                                              int(batch["image_mask"].sum()), fractions)  # fmt: skip
                state, m = step_fn(state, frozen, global_batch.to_global(micro, self.mesh, model_config.tokens_per_tile))
                m = jax.device_get(m)
                dt = time.perf_counter() - t0
                step += 1
                bar.update(1)
                window["tokens"] += int(m["tokens"])
                window["flops"] += step_flops  # of this process's rows; summed over processes when logged
                window["time"] += dt
                window["steps"] += 1
                lr_updates = updates  # the learning rate this step used
                updates += int(m["applied"])
                if step % log_every == 0 or step == total:
                    lrs = [float(schedules[g](lr_updates)) for g in sorted(schedules)]
                    record = {
                        "stage": self.name, "step": step, "loss": float(m["loss"]),
                        "learning_rate": float(schedules[first_group](lr_updates)), "learning_rates": lrs,
                        "grad_norm": float(m["grad_norm"]), "tokens_per_s": window["tokens"] / window["time"],
                        "step_time_s": window["time"] / window["steps"],
                        "mfu": hosts.sum_over_processes(window["flops"]) / window["time"] / peak if peak > 0 else None,
                        "skipped_records": sum(iterator.stats["skipped"].values()),
                        "nonfinite_steps": int(state.nonfinite), "empty_batches": int(state.empty),
                    }  # fmt: skip
                    self.writer.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
                    window = {"tokens": 0, "flops": 0.0, "time": 0.0, "steps": 0}
                if not m["finite"] and int(m["tokens"]) > 0:
                    bad_in_a_row += 1
                    if bad_in_a_row >= max_bad:
                        where = checkpoints.path(last_saved) if last_saved is not None else "none (no checkpoint yet)"
                        raise NonFiniteLoss(f"stage {self.name} step {step}: the loss or gradient was not finite "
                                            f"{bad_in_a_row} steps in a row; last good checkpoint: {where}")  # fmt: skip
                else:
                    bad_in_a_row = 0
                if hosts.any_process(self.stopper.requested):  # every process saves at the same step
                    save(step)
                    checkpoints.wait()
                    bar.close()
                    raise Preempted(f"SIGTERM: saved {checkpoints.path(step)}; run the same command to resume")
                if step % ckpt_every == 0 and step < total:
                    save(step)
            bar.close()
            if last_saved != step:
                save(step)
            checkpoints.wait()
        summary = {"stage": self.name, "steps": step, **state.counters(), "skipped_records": iterator.stats["skipped"]}
        if jax.process_index() == 0:
            run_dir.write_json(self.done_path, summary)
        return summary


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) every stage of `cfg` in `workdir`; returns the final summary."""
    with Stopper() as stopper:  # first: a SIGTERM from now on saves and exits cleanly
        stages.check(cfg)
        for name in stages.order(cfg):  # missing data stops the run before it writes anything
            stages.data_files(cfg.stages[name], name)
        mesh = build_mesh(cfg)
        for name in stages.order(cfg):  # a batch the mesh does not divide, too
            stages.batch_geometry(cfg.stages[name], name, mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
        check_workdir(workdir, cfg.to_dict(), stages.order(cfg))
        writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0)
        t0 = time.perf_counter()
        summaries = []
        previous = None
        try:
            for index, name in enumerate(stages.order(cfg)):
                summaries.append(StageRun(cfg, name, index, workdir, mesh, stopper, writer, previous).run())
                previous = run_dir.stage_dir(workdir, name)
        finally:
            writer.close()
    return {"workdir": workdir, "stages": summaries, "wall_s": round(time.perf_counter() - t0, 1)}
