"""`llava_jax.load(path)` -> `Pipeline`: a model with its tokenizer and image processor, ready to run."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llava_jax import quant
from llava_jax import sharding as shd
from llava_jax.checkpoints import gguf, hf, orbax, original
from llava_jax.checkpoints.params import read_params
from llava_jax.atomic import leftover_hint
from llava_jax.errors import CheckpointError, ConfigError, MissingInputError
from llava_jax.chat import ChatSession
from llava_jax.config import LlavaConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.data.prepare import PromptTooLong, prepare_inputs
from llava_jax.feature_cache import ImageFeatureCache
from llava_jax.generate import Generator, prompt_rows
from llava_jax.model import anyres, anyres_merge
from llava_jax.model.llava import LlavaModel, check_image_tokens
from llava_jax.samplers import make_sampler
from llava_jax.train import run_dir

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def abstract_model(config: LlavaConfig, quantization: dict | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating parameters; quantization:
    {kernel path: QuantSpec} (llava_jax.quant) turns those linears into QuantizedLinear."""
    def build():
        model = LlavaModel(config, rngs=nnx.Rngs(0))
        return quant.quantize_model(model, quant.plan_function(quantization)) if quantization else model

    return nnx.split(nnx.eval_shape(build))


def checkpoint_kind(path: str) -> str:
    """'llava_jax' (our model directory), 'run' (a training run's workdir), 'hf' (llava-hf), 'original'
    (haotian-liu/LLaVA) or 'gguf' (llama.cpp: a .gguf file, or a directory holding the model and its mmproj .gguf)."""
    if not os.path.exists(path):
        raise MissingInputError(f"no checkpoint at {path}{leftover_hint(path)}")
    if run_dir.is_run_dir(path):
        return "run"
    if os.path.isdir(path) and orbax.is_model_dir(path):
        return "llava_jax"
    if orbax.incomplete_model_dir(path):
        raise CheckpointError(f"{path} holds parameters but no {orbax.MARKER}: an interrupted write left it; "
                              "delete it and convert (or save) again")  # fmt: skip
    config_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config_path):
        cfg = original.read_json(config_path)
        if original.is_original_config(cfg):  # before model_type: original 1.5 configs say "llava" too
            return "original"
        if cfg.get("model_type") in ("llava", "llava_next"):
            return "hf"
        raise CheckpointError(f"{config_path} has model_type {cfg.get('model_type')!r}, which is not a LLaVA model")
    if gguf.is_gguf_checkpoint(path):
        return "gguf"
    raise CheckpointError(
        f"{path} is not a model: expected a llava-hf or original LLaVA directory (config.json + weights), "
        "a directory written by `python -m llava_jax.convert`, or a llama.cpp GGUF file (with its mmproj)"
    )


def load_model(path: str, dtype: str = "bfloat16", mesh: Mesh | None = None, progress: bool = False,
               vision_tower: str | None = None, mmproj: str | None = None, quantize: str | None = None):  # fmt: skip
    """Reads a checkpoint into a LlavaModel. Returns (model, config).

    vision_tower: the CLIP directory of an original LLaVA checkpoint (default: its mm_vision_tower).
    mmproj: the projector file of a GGUF language model (llama.cpp's mmproj-*.gguf).
    quantize: None, "int8", "int4" or "auto" (llava_jax.quant): the decoder's linear layers are
    quantized as each tensor is read (no float copy of them is kept); "auto" keeps a GGUF file's
    Q8_0 / Q4_0 tensors as they are and re-quantizes its other quants (float checkpoints stay float).
    A model directory stored quantized (`convert --quantize`) loads quantized whatever is asked.
    """
    kind = checkpoint_kind(path)
    if vision_tower is not None and kind != "original":
        raise ConfigError(f"vision_tower= is for original LLaVA checkpoints; {path} is a {kind} checkpoint")
    if mmproj is not None and kind != "gguf":
        raise ConfigError(f"mmproj= is for GGUF language models; {path} is a {kind} checkpoint")
    if quantize is not None and quantize != "auto":
        quant.spec_for(quantize, 0)  # validates the mode
    if kind == "run":
        model, config = load_run_model(path, dtype, mesh)
        return (model if quantize in (None, "auto") else quant.quantize_model(model, quantize)), config
    try:
        if kind == "llava_jax":
            config = orbax.read_config(path)
        elif kind == "hf":
            config = LlavaConfig.from_hf(path)
        elif kind == "gguf":
            config, tensors = gguf.load_gguf(path, mmproj)
        else:
            config, tensors, _ = original.load_original(path, vision_tower)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of the wrong type
        where = path if kind == "gguf" else os.path.join(path, orbax.MARKER if kind == "llava_jax" else "config.json")
        raise CheckpointError(f"{where}: a configuration field is missing or malformed ({type(e).__name__}: {e}); "
                              "the checkpoint is damaged or of an unsupported kind") from e  # fmt: skip
    config = config.replace(param_dtype=dtype, dtype=dtype)
    graphdef, abstract = abstract_model(config)
    if kind == "llava_jax":
        stored = quant.plan_from_json(orbax.read_quantization(path))
        if stored or quantize is None:
            return _restore(path, config, dtype, mesh, stored), config
        model = _restore(path, config, dtype, mesh, {})
        return quant.quantize_model(model, quantize if quantize != "auto" else (lambda *_: None)), config
    if kind == "hf":
        rules, source, ignore = hf.hf_rules(config), hf.HFTensors(path), hf.hf_ignored(config)
    elif kind == "gguf":
        rules, source, ignore = gguf.gguf_rules(config), tensors, gguf.gguf_ignored(config)
    else:
        rules, source, ignore = original.original_rules(config), tensors, original.original_ignored(config)
    plan = {}
    if quantize is not None:
        by_path = {r.path: r for r in rules}
        file_types = None
        if kind == "gguf":
            file_types = lambda p: [source.quant_type(k) for k in by_path[p].keys(config.text.num_layers)]
        plan = quant.load_plan(quantize, quant.kernel_paths(nnx.merge(graphdef, abstract)), file_types)
    target_graphdef, target = abstract_model(config, plan)
    shardings = shd.state_shardings(target, mesh) if mesh is not None else None
    state = read_params(rules, abstract, source, dtype=dtype, shardings=shardings, ignore=ignore, progress=progress,
                        quantize=plan)  # fmt: skip
    return nnx.merge(target_graphdef, state), config


def _restore(path: str, config: LlavaConfig, dtype: str, mesh: Mesh | None, plan: dict) -> LlavaModel:
    graphdef, abstract = abstract_model(config, plan)
    shardings = shd.state_shardings(abstract, mesh) if mesh is not None else None
    return nnx.merge(graphdef, orbax.restore_params(path, abstract, shardings, dtype))


def load_run_model(path: str, dtype: str, mesh: Mesh | None):
    """The latest checkpoint of a training run (LoRA adapters merged). Returns (model, config)."""
    run = run_dir.read_run(path, dtype)
    config = run.config.replace(param_dtype=dtype, dtype=dtype)
    graphdef, abstract = abstract_model(config)
    state = jax.tree.map(lambda v: v, abstract)
    nnx.replace_by_pure_dict(state, run_dir.merged_params(run))
    if mesh is not None:
        state = jax.device_put(state, shd.state_shardings(abstract, mesh))
    return nnx.merge(graphdef, state), config


def side_directory(path: str, vision_tower: str | None = None) -> str:
    """Where the tokenizer and preprocessor_config.json of a checkpoint live: the checkpoint itself, a
    training run's stage directory, or for an original LLaVA checkpoint its CLIP directory."""
    kind = checkpoint_kind(path)
    if kind == "run":
        return run_dir.latest_stage(path).side_dir
    if kind != "original":
        return path
    cfg = original.read_json(os.path.join(path, "config.json"))
    return original.find_vision_tower(path, cfg, vision_tower)


def load_image_processor(directory: str, config: LlavaConfig) -> ImageProcessor:
    """From `directory`/preprocessor_config.json, or from the model config alone where there is none
    (CLIP preprocessing at the tower's image size with OpenAI's mean and std)."""
    if os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        return ImageProcessor.from_pretrained(directory, config)
    return ImageProcessor.from_config(config)


def load_tokenizer_if_present(directory: str):
    """The checkpoint's tokenizer (llava_jax.data.tokenizer), or None where it ships no tokenizer files."""
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        return None
    from llava_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(directory)


def load_gguf_side(path: str, mmproj: str | None, config: LlavaConfig):
    """(tokenizer, image processor) of a GGUF pair: from the language model's and the projector's metadata.
    The tokenizer is None where the model file carries no tokenizer.ggml.model."""
    from llava_jax.data.gguf_tokenizer import tokenizer_from_gguf

    model_path, metadata, overrides = gguf.side_metadata(path, mmproj)
    tokenizer = tokenizer_from_gguf(metadata, model_path) if metadata is not None else None
    return tokenizer, ImageProcessor.from_config(config, overrides)


def load(path: str, dtype: str = "bfloat16", mesh: Mesh | None = None, vision_tower: str | None = None,
         generation_layout: str = "auto", mmproj: str | None = None,
         quantize: str | None = None) -> "Pipeline":  # fmt: skip
    """A Pipeline for a llava-hf, original LLaVA, llava_jax or GGUF model.

    dtype: parameters and activations ("float32" for exact parity, "bfloat16" for speed).
    mesh: a jax Mesh with axes from (data, fsdp, tensor) of any sizes and axis types (`jax.make_mesh` or
    `llava_jax.sharding.make_mesh`); parameters are laid out on it directly, never whole on one device.
    vision_tower: for an original LLaVA checkpoint, its CLIP directory (default: config.json's
    mm_vision_tower, a path absolute or relative to the checkpoint directory).
    mmproj: for a GGUF language model file (path), its multimodal projector file; a directory holding
    exactly one mmproj*.gguf and one other .gguf needs none.
    generation_layout: "copy" (a second, decode-friendly copy of the decoder's weights: fast on CPU),
    "scanned" (the model's own weights, no extra memory) or "auto" (copy on CPU where it fits in half
    the memory available, scanned elsewhere).
    quantize: None, "int8", "int4" or "auto": weight-only quantization of the decoder's linear layers
    (see `load_model` and llava_jax.quant).
    """
    model, config = load_model(path, dtype, mesh, vision_tower=vision_tower, mmproj=mmproj, quantize=quantize)
    if checkpoint_kind(path) == "gguf":
        tokenizer, image_processor = load_gguf_side(path, mmproj, config)
    else:
        tokenizer = load_tokenizer_if_present(side_directory(path) if checkpoint_kind(path) == "run" else path)
        image_processor = load_image_processor(side_directory(path, vision_tower), config)
    return Pipeline(model, config, mesh=mesh, directory=path, tokenizer=tokenizer,
                    image_processor=image_processor, generation_layout=generation_layout)  # fmt: skip


class Pipeline:
    """A loaded model and everything needed to run it (DESIGN.md, "Public interface")."""

    def __init__(self, model: LlavaModel, config: LlavaConfig, mesh: Mesh | None = None,
                 directory: str | None = None, tokenizer=None, image_processor=None,
                 generation_layout: str = "auto"):  # fmt: skip
        self.config = config
        self.mesh = shd.auto_view(mesh) if mesh is not None else None  # see llava_jax.sharding
        self.directory = directory
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._graphdef, self._state = nnx.split(model)
        self.eos_ids = read_eos_ids(directory, tokenizer)
        self.feature_cache = ImageFeatureCache(self._compute_image_features)
        self._features_source = self._state
        pad_id = getattr(tokenizer, "pad_id", None)
        if pad_id is None or pad_id < 0 or pad_id == config.image_token_id:
            pad_id = 0 if config.image_token_id != 0 else 1  # padding is masked: any id but the image token
        self._generator = Generator(self._graphdef, lambda: self._state, config, pad_id=pad_id,
                                    decode_text=tokenizer.decode if tokenizer is not None else None,
                                    layout=generation_layout)  # fmt: skip

    @property
    def model(self) -> LlavaModel:
        return nnx.merge(self._graphdef, self._state)

    def _device_input(self, x, axes):
        if x is None:
            return None
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, shd.logical_to_spec(axes, self.mesh, x.shape)))

    @functools.cached_property
    def _forward(self):
        graphdef = self._graphdef

        @jax.jit
        def forward(state, input_ids, pixel_values, attention_mask, feature_index):
            model = nnx.merge(graphdef, state)
            return model(input_ids, pixel_values, attention_mask, feature_index=feature_index)

        return forward

    def prepare(self, text: str, images=()) -> dict:
        """{"input_ids", "attention_mask", "pixel_values", "image_sizes"} for one prompt, as HF's
        LlavaProcessor / LlavaNextProcessor give them: each `<image>` expanded to the image's token count
        (see llava_jax.data.prepare). `pipe.logits(**pipe.prepare(text, images))` runs it."""
        return prepare_inputs(text, images, tokenizer=self.tokenizer, image_processor=self.image_processor,
                              config=self.config)  # fmt: skip

    def logits(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> np.ndarray:
        """Logits of whole sequences, as HF's `model(**inputs).logits`.

        input_ids: [B, T] (or [T]); pixel_values: [N, C, H, W] (NeXT: [N, P, C, H, W] with image_sizes
        [N, 2]); attention_mask: [B, T]. Returns np.float32 [B, T, V].
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.shape[-1] > self.config.context_length:
            raise PromptTooLong(f"input_ids hold {input_ids.shape[-1]} positions, more than the model's context of "
                                f"{self.config.context_length} (max_position_embeddings); shorten the input")  # fmt: skip
        model = self.model
        n_features = 0 if pixel_values is None else model.num_image_features(np.shape(pixel_values), image_sizes)
        check_image_tokens(input_ids, self.config.image_token_id, n_features)
        pixel_values = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        feature_index = None
        if pixel_values is not None and self.config.is_anyres:  # the token layout, on the host
            n, p = pixel_values.shape[:2]
            feature_index = anyres_merge.padded_feature_index(self.config, image_sizes, p, num_images=n)
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask, np.int32).reshape(input_ids.shape)
        with self._mesh_context():
            out = self._forward(
                self._state,
                self._device_input(input_ids.astype(np.int32), ("batch", None)),
                self._device_input(pixel_values, ("batch",) + (None,) * (np.ndim(pixel_values) - 1)),
                self._device_input(attention_mask, ("batch", None)),
                None if feature_index is None else jnp.asarray(feature_index),
            )
        return np.asarray(jax.device_get(out), np.float32)

    # -- generation -----------------------------------------------------------------------------

    @functools.cached_property
    def _image_features_fn(self):
        graphdef = self._graphdef

        @jax.jit
        def image_features(state, pixel_values, feature_index):
            return nnx.merge(graphdef, state).image_features(pixel_values, feature_index=feature_index)

        return image_features

    def _compute_image_features(self, pixel_values: np.ndarray, image_sizes: np.ndarray | None) -> list[jax.Array]:
        """Each image's features [F_i, D] (pixel_values [n, ...]); the vision tower runs here, once."""
        n = len(pixel_values)
        feature_index = None
        counts = [self.config.tokens_per_tile] * n
        if self.config.is_anyres:  # the token layout, on the host; one compiled shape per (n, tile count)
            feature_index = anyres_merge.padded_feature_index(self.config, image_sizes, pixel_values.shape[1], n)
            counts = [anyres.num_image_tokens(self.config, size) for size in image_sizes]
            feature_index = jnp.asarray(feature_index)
        with self._mesh_context():
            pixels = self._device_input(pixel_values, ("batch",) + (None,) * (pixel_values.ndim - 1))
            features = self._image_features_fn(self._state, pixels, feature_index)
        starts = np.cumsum([0, *counts])
        return [features[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def _mesh_context(self):
        return shd.use_mesh(self.mesh)

    def _prepare_generation(self, input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens, temperature,
                            top_k, top_p, seed, stop, eos_ids):  # fmt: skip
        rows = prompt_rows(input_ids, attention_mask)
        if self._features_source is not self._state:  # new parameters: cached features are stale
            self.feature_cache.clear()
            self._features_source = self._state
        model = self.model
        n_features = 0 if pixel_values is None else model.num_image_features(np.shape(pixel_values), image_sizes)
        check_image_tokens(np.concatenate(rows), self.config.image_token_id, n_features)
        features = None if pixel_values is None else self.feature_cache.features(pixel_values, image_sizes)
        kwargs = dict(max_new_tokens=max_new_tokens, sampler=make_sampler(temperature, top_k, top_p), seed=seed,
                      eos_ids=self.eos_ids if eos_ids is None else tuple(eos_ids), stop=tuple(stop))  # fmt: skip
        return rows, features, kwargs

    def generate(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, max_new_tokens=256,
                 temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=(), eos_ids=None) -> list[list[int]]:  # fmt: skip
        """New token ids for each prompt, as HF's `generate(...)[:, T:]` without the padding after eos.

        input_ids: [B, T] (left- or right-padded, with attention_mask), [T], or a list of ragged
        token lists; pixel_values / image_sizes as for `logits`. Greedy for temperature 0, else
        sampling with top_k (0 = off) and top_p (1.0 = off); the same seed gives the same output.
        A row ends after an eos id (eos_ids, default the checkpoint's), after the token that
        completes a stop string (needs the tokenizer), or at max_new_tokens or the context length.
        """
        rows, features, kwargs = self._prepare_generation(input_ids, pixel_values, image_sizes, attention_mask,
                                                          max_new_tokens, temperature, top_k, top_p, seed, stop,
                                                          eos_ids)  # fmt: skip
        with self._mesh_context():
            return self._generator.generate(rows, features, **kwargs)

    def generate_stream(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *,
                        max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=(),
                        eos_ids=None) -> Iterator[list[list[int]]]:  # fmt: skip
        """As `generate`, yielding each row's new ids as they come (one decode step at a time)."""
        rows, features, kwargs = self._prepare_generation(input_ids, pixel_values, image_sizes, attention_mask,
                                                          max_new_tokens, temperature, top_k, top_p, seed, stop,
                                                          eos_ids)  # fmt: skip
        with self._mesh_context():
            yield from self._generator.stream(rows, features, chunk=1, **kwargs)

    def chat(self, prompt: str, images=(), template: str | None = None, **sampling) -> str:
        """One turn: `prompt` about `images` (paths, bytes or PIL images) rendered with `template`
        (default: the one the original LLaVA CLI picks for this checkpoint); returns the reply.
        sampling: generate's keywords (max_new_tokens, temperature, top_k, top_p, seed).
        For several turns use `llava_jax.chat.ChatSession`."""
        return ChatSession(self, images, template).ask(prompt, **sampling)

    def chat_stream(self, prompt: str, images=(), template: str | None = None, **sampling) -> Iterator[str]:
        """As `chat`, yielding the reply's text as it is generated."""
        return ChatSession(self, images, template).ask_stream(prompt, **sampling)


def read_eos_ids(directory: str | None, tokenizer=None) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json, else config.json (text_config), else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(directory, name) if directory else None
        if path and os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            eos = cfg.get("eos_token_id", (cfg.get("text_config") or {}).get("eos_token_id"))
            if eos is not None:
                return tuple(sorted({int(e) for e in (eos if isinstance(eos, list) else [eos])}))
    eos = getattr(tokenizer, "eos_id", None)
    return () if eos is None or eos < 0 else (int(eos),)
