"""Where stage 1 starts: a CLIP vision tower and a LLaMA-family language model, joined by a fresh projector.

The original LLaVA's `--vision_tower CLIP --model_name_or_path LLM` (+ `--pretrain_mm_mlp_adapter
mm_projector.bin` for stage 2), with the result following llava-hf's conventions:

- Vision: a CLIP directory (transformers `CLIPVisionModel` or a full `CLIPModel`; safetensors or
  `pytorch_model.bin`), read as `checkpoints/original.py` reads an original checkpoint's tower.
- Language model: a `LlamaForCausalLM` / `MistralForCausalLM` directory, whose keys (`model.*`,
  `lm_head.weight`) are the original LLaVA's own.
- Tokenizer: the LM's `tokenizer.model` with `<image>` and `<pad>` added after its pieces, written with
  a llava-hf release's config files (`llava_jax.data.tiny_tokenizer.write_llava_hf_tokenizer`);
  `image_token_id` is the `<image>` id.
- Embeddings and lm_head are resized as transformers' `convert_llava_weights_to_hf.py` does: the table
  grows to hold the added ids, rounded up to a multiple of 64 (`resize_token_embeddings(V + 2, 64)`);
  every new row, of the embeddings and of lm_head alike, is drawn from a multivariate normal whose mean
  is the mean of the old *embedding* rows and whose covariance is 1e-5 times their (biased, divided by
  n) covariance. We draw with numpy (seeded; eigendecomposition, so a singular covariance works too)
  instead of torch's generator, so the rows follow the same rule but are not torch's bits.
- Projector: initialised as the original's `build_vision_projector` leaves it (plain `nn.Linear`s
  created after `from_pretrained`): PyTorch's default, weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (kaiming_uniform with a=sqrt(5)), bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
- image_newline (anyres with 'spatial_unpad'): randn(D) / sqrt(D), as the original's
  `initialize_vision_modules`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from flax import nnx

from llava_jax.checkpoints import original
from llava_jax.checkpoints.params import read_params
from llava_jax.checkpoints.torch_bin import TorchBinCheckpoint
from llava_jax.config import LlavaConfig, projector_depth, text_config_from_hf, vision_config_from_clip
from llava_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llava_jax.data.tiny_tokenizer import write_llava_hf_tokenizer
from llava_jax.errors import CheckpointError, ConfigError
from llava_jax.model.llava import LlavaModel

ADDED_TOKENS = ("<image>", "<pad>")
PAD_VOCAB_TO = 64  # transformers' conversion: resize_token_embeddings(vocab + 2, pad_to_multiple_of=64)
NEW_ROW_COVARIANCE = 1e-5
CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
LM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MM_PROJECTOR_FILE = "mm_projector.bin"
# The LlavaConfig fields a components start takes from the stage config.
SETTABLE = ("projector_type", "vision_feature_layer", "vision_feature_select_strategy", "image_aspect_ratio",
            "image_grid_pinpoints", "patch_merge_type")  # fmt: skip
# Independent random streams, so that changing one part's shape leaves the others' draws alone.
_EMBED, _LM_HEAD, _PROJECTOR, _NEWLINE = range(4)


def read_clip_config(clip_dir: str) -> dict[str, Any]:
    cfg = original.read_json(os.path.join(clip_dir, "config.json"))
    if cfg.get("model_type") not in CLIP_MODEL_TYPES:
        raise CheckpointError(
            f"{clip_dir}/config.json has model_type {cfg.get('model_type')!r}; the vision tower must be a CLIP "
            "directory (transformers CLIPVisionModel or CLIPModel, e.g. openai/clip-vit-large-patch14-336)"
        )
    return cfg


def read_lm_config(lm_dir: str) -> dict[str, Any]:
    cfg = original.read_json(os.path.join(lm_dir, "config.json"))
    architectures = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("llama", "mistral") or (architectures and not set(architectures) & set(LM_ARCHITECTURES)):
        raise CheckpointError(
            f"{lm_dir}/config.json is a {cfg.get('model_type')!r} model ({architectures}); the language model must "
            f"be LLaMA-family: one of {LM_ARCHITECTURES} (e.g. lmsys/vicuna-7b-v1.5)"
        )
    return cfg


def grown_vocab(vocab_size: int, added_ids) -> int:
    """The embedding rows once the added ids fit: rounded up to PAD_VOCAB_TO when it has to grow."""
    needed = max(vocab_size, max(added_ids) + 1)
    return vocab_size if needed == vocab_size else -(-needed // PAD_VOCAB_TO) * PAD_VOCAB_TO


def new_embedding_rows(embeddings: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows ~ N(mean of `embeddings` [V, D], 1e-5 x their covariance). Returns float32 [count, D]."""
    old = np.asarray(embeddings, np.float64)
    mean = old.mean(axis=0)
    centred = old - mean
    covariance = centred.T @ centred / len(old)
    rows = rng.multivariate_normal(mean, NEW_ROW_COVARIANCE * covariance, size=count, method="eigh")
    return rows.astype(np.float32)


def torch_linear_init(d_in: int, d_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch nn.Linear's default: (weight [d_out, d_in], bias [d_out]), both U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / np.sqrt(d_in)
    weight = rng.uniform(-bound, bound, (d_out, d_in)).astype(np.float32)
    return weight, rng.uniform(-bound, bound, d_out).astype(np.float32)


def fresh_projector(config: LlavaConfig, seed: int, prefix: str = "model.mm_projector") -> dict[str, np.ndarray]:
    """The projector's tensors under the original's names (see original.mm_projector_rules)."""
    rng = np.random.default_rng([seed, _PROJECTOR])
    depth, d_text = projector_depth(config.projector_type), config.text.hidden_size
    tensors = {}
    for i in range(depth):
        weight, bias = torch_linear_init(config.projector_in_dim if i == 0 else d_text, d_text, rng)
        key = prefix if config.projector_type == "linear" else f"{prefix}.{2 * i}"
        tensors[f"{key}.weight"], tensors[f"{key}.bias"] = weight, bias
    return tensors


class ComponentTensors:
    """The LM's and CLIP's tensors under the original LLaVA's names (original.OriginalTensors), with some
    keys replaced or added (resized embeddings, a fresh projector)."""

    def __init__(self, base: original.OriginalTensors, replaced: dict[str, np.ndarray]):
        self.base = base
        self.replaced = replaced

    def keys(self) -> list[str]:
        return list(dict.fromkeys([*self.base.keys(), *self.replaced]))

    def file_key(self, key: str) -> str:
        return f"{key} (initialised)" if key in self.replaced else self.base.file_key(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.replaced[key].shape) if key in self.replaced else self.base.shape(key)

    def read(self, key: str) -> np.ndarray:
        return self.replaced[key] if key in self.replaced else self.base.read(key)


def write_tokenizer(tokenizer_dir: str, out_dir: str) -> dict[str, int]:
    """The LM's tokenizer.model with `<image>` and `<pad>` added, as llava-hf files in `out_dir`.
    Returns the added tokens' ids."""
    path = os.path.join(tokenizer_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: the language model's sentencepiece tokenizer is needed (LLaMA-family models "
            "ship tokenizer.model)"
        )
    with open(path, "rb") as f:
        proto = f.read()
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    legacy = original.read_json(config_path).get("legacy") if os.path.isfile(config_path) else None
    return write_llava_hf_tokenizer(out_dir, proto, added_tokens=ADDED_TOKENS, legacy=legacy)


def write_preprocessor_config(clip_dir: str, out_dir: str, config: LlavaConfig) -> None:
    """The CLIP directory's preprocessor_config.json, else CLIP's preprocessing at the tower's size."""
    target = os.path.join(out_dir, "preprocessor_config.json")
    source = os.path.join(clip_dir, "preprocessor_config.json")
    if os.path.isfile(source):
        shutil.copyfile(source, target)
        return
    side = config.vision.image_size
    pre = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }  # fmt: skip
    with open(target, "w") as f:
        json.dump(pre, f, indent=2)


def init_from_components(clip_dir: str, lm_dir: str, out_dir: str, *, projector_type: str = "mlp2x_gelu",
                         vision_feature_layer: int | tuple[int, ...] = -2,
                         vision_feature_select_strategy: str = "default", image_aspect_ratio: str = "pad",
                         image_grid_pinpoints=None, patch_merge_type: str = "flat", mm_projector: str | None = None,
                         tokenizer_dir: str | None = None, seed: int = 0, dtype: str = "float32",
                         shardings=None) -> tuple[LlavaConfig, nnx.State]:  # fmt: skip
    """A LlavaModel state from a CLIP directory and an LM directory (see the module docstring).

    Writes the tokenizer (from `tokenizer_dir`, default `lm_dir`) and preprocessor_config.json into
    `out_dir`, the directory the run keeps. image_grid_pinpoints: (height, width) pairs, as llava-hf.
    mm_projector: the original's released mm_projector.bin (or its directory) to start the projector
    from instead of a fresh one. shardings: as for `read_params`. Returns (config, state).
    """
    lm_cfg = read_lm_config(lm_dir)
    vision = vision_config_from_clip(read_clip_config(clip_dir))
    text = text_config_from_hf(lm_cfg)
    os.makedirs(out_dir, exist_ok=True)
    ids = write_tokenizer(tokenizer_dir or lm_dir, out_dir)
    vocab = grown_vocab(text.vocab_size, ids.values())
    config = LlavaConfig(
        vision=vision, text=dataclasses.replace(text, vocab_size=vocab),
        projector_type=projector_type, projector_bias=True, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy, image_token_id=ids["<image>"],
        image_aspect_ratio=image_aspect_ratio,
        image_grid_pinpoints=None if image_grid_pinpoints is None else tuple(map(tuple, image_grid_pinpoints)),
        patch_merge_type=patch_merge_type if image_grid_pinpoints is not None else "flat",
        semantics="hf", model_max_length=lm_cfg.get("max_position_embeddings"), param_dtype=dtype, dtype=dtype,
    )  # fmt: skip
    replaced = fresh_projector(config, seed)
    base = original.OriginalTensors(lm_dir, clip_dir)
    if "model.embed_tokens.weight" not in base.keys():
        raise CheckpointError(f"{lm_dir} holds no model.embed_tokens.weight: not a LlamaForCausalLM/MistralForCausalLM")
    embeddings = base.read("model.embed_tokens.weight")
    grow = vocab - text.vocab_size
    if grow:
        replaced["model.embed_tokens.weight"] = np.concatenate(
            [embeddings, new_embedding_rows(embeddings, grow, np.random.default_rng([seed, _EMBED]))]
        )
        if not text.tie_word_embeddings:
            head = base.read("lm_head.weight")
            replaced["lm_head.weight"] = np.concatenate(
                [head, new_embedding_rows(embeddings, grow, np.random.default_rng([seed, _LM_HEAD]))]
            )
    if config.has_image_newline:
        d = text.hidden_size
        replaced["model.image_newline"] = (np.random.default_rng([seed, _NEWLINE]).standard_normal(d) / np.sqrt(d)).astype(np.float32)
    write_preprocessor_config(clip_dir, out_dir, config)
    abstract = nnx.state(nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0))))
    source = ComponentTensors(base, replaced)
    state = read_params(original.original_rules(config), abstract, source, dtype=dtype, shardings=shardings,
                        ignore=original.original_ignored(config))  # fmt: skip
    if mm_projector is not None:
        state = load_mm_projector(state, config, mm_projector)
    return config, state


class _ProjectorFile:
    """An mm_projector.bin with every key presented as `model.mm_projector.<rest>` (the original loads it by
    the part after 'mm_projector.', whatever precedes it)."""

    def __init__(self, path: str):
        self.path = path
        self.source = TorchBinCheckpoint.from_file(path)
        self._names = {}
        for key in self.source.keys():
            if "mm_projector." in key:
                self._names["model.mm_projector." + key.split("mm_projector.", 1)[1]] = key
        if not self._names:
            raise CheckpointError(f"{path} holds no mm_projector.* tensors (keys: {self.source.keys()[:6]})")

    def keys(self) -> list[str]:
        return list(self._names)

    def file_key(self, key: str) -> str:
        return f"{self._names.get(key, key)} (in {self.path})"

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._names[key])

    def read(self, key: str) -> np.ndarray:
        return self.source.read(self._names[key])


def load_mm_projector(params, config: LlavaConfig, path: str):
    """`params` (a pure dict from `nnx.to_pure_dict`, or an nnx.State) with the projector read from the
    original's mm_projector.bin (a file, or a directory holding one): `model.mm_projector.{0,2}.{weight,bias}`
    for mlp2x_gelu, `model.mm_projector.{weight,bias}` for 'linear'. Returns the same kind as given; each
    new array takes the dtype and sharding of the one it replaces."""
    if os.path.isdir(path):
        path = os.path.join(path, MM_PROJECTOR_FILE)
    source = _ProjectorFile(path)
    rules = original.mm_projector_rules(config)
    expected = {r.key for r in rules}
    unexpected = sorted(source.file_key(k) for k in set(source.keys()) - expected)
    missing = sorted(expected - set(source.keys()))
    where = f"{path} does not fit this model's {config.projector_type} projector ({config.projector_in_dim} -> {config.text.hidden_size})"
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing {missing}, unexpected {unexpected}")
    is_state = isinstance(params, nnx.State)
    pure = nnx.to_pure_dict(params) if is_state else params
    pure = jax.tree.map(lambda x: x, pure)  # a copy of the containers; arrays are shared
    for rule in rules:
        *parents, leaf = [int(p) if p.isdigit() else p for p in rule.path.split(".")]
        node = pure
        for part in parents:
            node = node[part] if part in node else node[str(part)]
        old = node[leaf]
        value = rule.to_model(source.read(rule.key))
        if tuple(value.shape) != tuple(old.shape):
            raise CheckpointError(f"{where}: {source.file_key(rule.key)} has shape {source.shape(rule.key)}, "
                                  f"the model's {rule.path} needs {tuple(old.shape)} in our layout")  # fmt: skip
        sharding = getattr(old, "sharding", None)
        node[leaf] = jax.device_put(np.asarray(value, old.dtype), sharding)
    if not is_state:
        return pure
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, pure)
    return state


@dataclasses.dataclass
class Start:
    """What `llava_jax.train.sources` takes from a start: the model config, its parameters (pure dict), the
    directory of its tokenizer and preprocessor files, and its chat template (None: the stage's)."""

    config: LlavaConfig
    params: dict
    side_dir: str
    template: str | None = None


def stage1_start(init, model_values: dict, *, seed: int, param_dtype: str, out_dir: str | None = None) -> Start:
    """The trainer's `init.kind = "components"`: init.vision_tower (CLIP directory), init.language_model (LM
    directory), optional init.tokenizer (default: the LM's); `model_values`: LlavaConfig fields of the
    stage (projector_type, vision_feature_layer, image_aspect_ratio, image_grid_pinpoints, ...).
    The tokenizer and preprocessor files go to `out_dir` (default: a new temporary directory, which the
    trainer copies into the run)."""
    values = dict(model_values or {})
    for part in ("vision", "text"):
        if values.pop(part, None):
            raise ConfigError(f"init.kind 'components' takes the {part} tower's shape from its directory; remove "
                              f"model.{part} from the stage config")  # fmt: skip
    for key in set(values) - set(SETTABLE):
        raise ConfigError(f"model.{key} cannot be set for init.kind 'components' (the towers' directories and the "
                          f"tokenizer decide it); settable: {list(SETTABLE)}")  # fmt: skip
    for path_field in ("vision_tower", "language_model"):
        if not init.get(path_field, ""):
            raise ConfigError(f"init.{path_field} is empty; init.kind 'components' needs a CLIP directory "
                              "(init.vision_tower) and a LLaMA/Mistral directory (init.language_model)")  # fmt: skip
    if isinstance(values.get("vision_feature_layer"), list):
        values["vision_feature_layer"] = tuple(values["vision_feature_layer"])
    out = out_dir or tempfile.mkdtemp(prefix="llava_jax_start_")
    config, state = init_from_components(init.vision_tower, init.language_model, out, seed=seed, dtype=param_dtype,
                                         tokenizer_dir=init.get("tokenizer", "") or None, **values)  # fmt: skip
    return Start(config, nnx.to_pure_dict(state), out)
