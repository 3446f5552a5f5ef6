"""Converts a checkpoint into a llava_jax model directory, or exports one to transformers or peft.

    python -m llava_jax.convert --src llava-1.5-7b-hf --out llava15-7b-jax [--dtype bfloat16]
    python -m llava_jax.convert --src llava-v1.5-7b --vision_tower clip-vit-large-patch14-336 --out ...
    python -m llava_jax.convert --src llava-v1.5-7b-Q4_K_M.gguf --mmproj mmproj-model-f16.gguf --out ...
    python -m llava_jax.convert --src MODEL_OR_RUN --out DIR --to hf      # a llava-hf directory
    python -m llava_jax.convert --src LORA_RUN --out DIR --to peft        # its adapters, as peft saves them
    python -m llava_jax.convert --src LORA_RUN --out BASE --to hf --lora base   # the base they apply to
    python -m llava_jax.convert --src llava-1.5-7b-hf --out llava15-7b-int8 --quantize int8
    python -m llava_jax.convert --src llava15-7b-jax --out gguf-dir --to gguf --outtype q8_0

--to llava_jax (the default): orbax parameters + config + tokenizer. --to hf: what transformers'
`AutoModelForImageTextToText` / `AutoProcessor` load (LoRA adapters merged in, or left out with
--lora base). --to peft: the LoRA adapters alone, for `peft.PeftModel.from_pretrained` on the
--to hf --lora base export of the same run.
Tensors are read one at a time and cast to --dtype, so a 7B checkpoint converts to bfloat16 within
about 16 GB of memory. The last line printed is a JSON summary; a user's mistake is one line, exit 2.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import tempfile
import time

import jax
from absl import app, flags, logging
from flax import nnx

from llava_jax import quant
from llava_jax.atomic import check_new_dir
from llava_jax.chat import checkpoint_template
from llava_jax.checkpoints import orbax
from llava_jax.errors import ConfigError, UserError, one_line, run_app
from llava_jax.pipeline import checkpoint_kind, load_image_processor, load_model, load_tokenizer_if_present, side_directory

_SRC = flags.DEFINE_string("src", None, "llava-hf or original LLaVA checkpoint directory, a GGUF language model, "
                           "or (--to hf / peft) a llava_jax model directory or a training run's workdir.")  # fmt: skip
_VISION_TOWER = flags.DEFINE_string("vision_tower", None, "Original LLaVA only: the CLIP directory "
                                    "(default: config.json's mm_vision_tower).")  # fmt: skip
_MMPROJ = flags.DEFINE_string("mmproj", None, "GGUF only: the multimodal projector file of --src.")
_OUT = flags.DEFINE_string("out", None, "Output directory: new or empty; written aside (OUT.partial) and renamed "
                           "into place when complete.")  # fmt: skip
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter dtype to store.")
_TO = flags.DEFINE_enum("to", "llava_jax", ["llava_jax", "hf", "peft", "gguf"], "Output format: a llava_jax model "
                        "directory, a llava-hf (transformers) directory, peft LoRA adapters, or the GGUF pair "
                        "llama.cpp reads (DIR/model-OUTTYPE.gguf + DIR/mmproj-model-f16.gguf).")  # fmt: skip
_MAX_SHARD = flags.DEFINE_integer("max_shard_bytes", None, "--to hf: largest safetensors shard (default 50 GB, "
                                  "as transformers).")  # fmt: skip
_LORA = flags.DEFINE_enum("lora", None, ["merge", "base"], "--to hf from a LoRA run: merge the adapters into "
                          "the weights (default), or leave them out (the base that --to peft's adapters apply to).")
_BASE_MODEL = flags.DEFINE_string("base_model", None, "--to peft: base_model_name_or_path recorded in "
                                  "adapter_config.json (e.g. the --to hf export of the same run).")  # fmt: skip
_OUTTYPE = flags.DEFINE_enum("outtype", None, ["f32", "f16", "q8_0"], "--to gguf: the language model's weight type "
                             "(default f16).")  # fmt: skip
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4", "auto"],
                              "--to llava_jax: store the decoder's linear layers quantized (llava_jax.quant); 'auto' "
                              "keeps a GGUF file's Q8_0/Q4_0 tensors as they are.")  # fmt: skip


def convert(src: str, out: str, dtype: str = "bfloat16", progress: bool = True,
            vision_tower: str | None = None, mmproj: str | None = None,
            quantize: str | None = None) -> dict:  # fmt: skip
    start = time.time()
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConfigError("--out must differ from --src")
    check_new_dir(out)  # before the minutes of loading
    kind = checkpoint_kind(src)
    if kind == "llava_jax":
        raise ConfigError(f"--src {src} is already a llava_jax model directory; load it directly")
    model, config = load_model(src, dtype=dtype, progress=progress, vision_tower=vision_tower, mmproj=mmproj,
                               quantize=quantize)  # fmt: skip
    state = nnx.state(model)
    preprocessor = os.path.join(side_directory(src, vision_tower), "preprocessor_config.json")

    def side_files(directory: str) -> None:  # before the marker: a killed conversion leaves no model
        if kind == "gguf":
            write_gguf_side_files(src, mmproj, directory)
        if not os.path.exists(os.path.join(directory, "preprocessor_config.json")) and os.path.isfile(preprocessor):
            shutil.copy2(preprocessor, directory)  # an original checkpoint's lives in its CLIP directory

    orbax.save_model_dir(out, state, config, copy_from=None if kind == "gguf" else src,
                         template=checkpoint_template(src, config), extra_files=side_files)  # fmt: skip
    n_params = sum(x.size for x in jax.tree.leaves(state))
    return {"src": src, "out": out, "dtype": dtype, "quantize": quantize, "parameters": int(n_params),
            "bytes": quant.parameter_bytes(state), "seconds": round(time.time() - start, 1)}  # fmt: skip


def export_gguf(src: str, out: str, dtype: str = "float32", outtype: str = "f16", vision_tower: str | None = None,
                mmproj: str | None = None) -> dict:  # fmt: skip
    """Any checkpoint `load_model` reads -> the GGUF pair llama.cpp reads (checkpoints/gguf_export.py)."""
    import tempfile

    from llava_jax.checkpoints import gguf_export
    from llava_jax.pipeline import load_gguf_side, load_image_processor

    start = time.time()
    kind = checkpoint_kind(src)
    model, config = load_model(src, dtype=dtype, vision_tower=vision_tower, mmproj=mmproj)
    gguf_export.check_exportable(config)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "gguf":
            _, processor = load_gguf_side(src, mmproj, config)
            write_gguf_side_files(src, mmproj, scratch)
            tokenizer_dir = scratch
        else:
            processor = load_image_processor(side_directory(src, vision_tower), config)
            tokenizer_dir = src
        name = os.path.basename(os.path.normpath(src))
        paths = gguf_export.export_gguf(out, nnx.state(model), config, tokenizer_dir, processor.image_mean,
                                        processor.image_std, outtype, name=name)  # fmt: skip
    return {"src": src, "model": paths[0], "mmproj": paths[1], "outtype": outtype,
            "seconds": round(time.time() - start, 1)}  # fmt: skip


def write_gguf_side_files(src: str, mmproj: str | None, out: str) -> None:
    """The tokenizer (tokenizer.model + tokenizer_config.json) and preprocessor_config.json (mean, std)
    of a GGUF pair, so that `load(out)` gets what `load(src, mmproj=...)` gets."""
    from llava_jax.checkpoints import gguf
    from llava_jax.data.gguf_tokenizer import write_tokenizer_files

    model_path, metadata, overrides = gguf.side_metadata(src, mmproj)
    if metadata is not None:
        write_tokenizer_files(metadata, out, model_path)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(overrides, f, indent=2)


def to_hf(src: str, out: str, dtype: str = "bfloat16", vision_tower: str | None = None, mmproj: str | None = None,
          max_shard_bytes: int | None = None, lora: str = "merge", progress: bool = True) -> dict:  # fmt: skip
    """Any checkpoint `llava_jax.load` reads -> a llava-hf directory (see checkpoints/hf_export.py).

    lora: for a LoRA run, "merge" folds the adapters into the weights; "base" leaves them out (the base
    model that `--to peft`'s adapters apply to).
    """
    from llava_jax.checkpoints import hf_export
    from llava_jax.pipeline import load_gguf_side

    start = time.time()
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConfigError("--out must differ from --src")
    if lora not in ("merge", "base"):
        raise ConfigError(f"--lora must be 'merge' or 'base', got {lora!r}")
    kind = checkpoint_kind(src)
    if lora == "base":
        from llava_jax.train.lora import base_state

        model, config, _ = lora_run_model(src, dtype)
        state = base_state(model)
    else:
        model, config = load_model(src, dtype=dtype, progress=progress, vision_tower=vision_tower, mmproj=mmproj)
        state = nnx.state(model)
    with tempfile.TemporaryDirectory() as side:
        if kind == "gguf":
            write_gguf_side_files(src, mmproj, side)
            tokenizer, image_processor = load_gguf_side(src, mmproj, config)
            tokenizer_dir = side
        else:
            tokenizer_dir = side_directory(src) if kind == "run" else src  # an original's side dir is its CLIP
            tokenizer = load_tokenizer_if_present(tokenizer_dir)
            image_processor = load_image_processor(side_directory(src, vision_tower), config)
        summary = hf_export.export_hf(out, state, config, image_processor,
                                      tokenizer_dir=tokenizer_dir if tokenizer is not None else None,
                                      tokenizer=tokenizer,
                                      max_shard_bytes=max_shard_bytes or hf_export.DEFAULT_MAX_SHARD_BYTES)  # fmt: skip
    return {"src": src, **summary, "seconds": round(time.time() - start, 1)}


def lora_run_model(src: str, dtype: str):
    """A LoRA run's latest model with its adapters unmerged: (model, config, LoraSettings)."""
    from llava_jax.errors import CheckpointError
    from llava_jax.model.llava import LlavaModel
    from llava_jax.train import lora, run_dir

    if not run_dir.is_run_dir(src):
        raise CheckpointError(f"{src} is not a training run's workdir (no {run_dir.RUN_FILE}); LoRA adapters are "
                              "read from a LoRA run")  # fmt: skip
    run = run_dir.read_run(src, dtype)
    if not run.lora:
        raise CheckpointError(f"the latest stage of the run in {src} was not trained with LoRA: there are no "
                              "adapters; export the whole model with --to hf")  # fmt: skip
    settings = lora.LoraSettings.from_dict(run.lora)
    config = run.config.replace(param_dtype=dtype, dtype=dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: lora.apply_lora(
        LlavaModel(config, rngs=nnx.Rngs(0)), **settings.to_dict(), rngs=nnx.Rngs(1))))  # fmt: skip
    nnx.replace_by_pure_dict(state, run.params)
    return nnx.merge(graphdef, state), config, settings


def to_peft(src: str, out: str, dtype: str = "float32", base_model: str | None = None) -> dict:
    """A LoRA training run's workdir -> its adapters as peft saves them (see checkpoints/peft_export.py).
    They apply to the run's `--to hf --lora base` export."""
    from llava_jax.checkpoints import peft_export

    start = time.time()
    model, config, settings = lora_run_model(src, dtype)
    summary = peft_export.export_peft(out, model, config, settings, base_model_name_or_path=base_model)
    return {"src": src, **summary, "seconds": round(time.time() - start, 1)}


# --to value -> function(src, out, dtype, **options); options are the flags below that it takes.
EXPORTERS = {"llava_jax": convert, "hf": to_hf, "peft": to_peft, "gguf": export_gguf}
OPTION_FLAGS = {"vision_tower": _VISION_TOWER, "mmproj": _MMPROJ, "max_shard_bytes": _MAX_SHARD, "lora": _LORA,
                "base_model": _BASE_MODEL, "outtype": _OUTTYPE, "quantize": _QUANTIZE}  # fmt: skip


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("--src and --out are required")
    export = EXPORTERS[_TO.value]
    options = {name: flag.value for name, flag in OPTION_FLAGS.items() if flag.value is not None}
    for name in options:
        if name not in inspect.signature(export).parameters:
            raise app.UsageError(f"--{name} does not apply to --to {_TO.value}")
    try:
        dtype = _DTYPE.value if _DTYPE.present or _TO.value != "gguf" else "float32"  # GGUF: f32 unless asked
        summary = export(_SRC.value, _OUT.value, dtype, **options)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        print(one_line(e), file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_app(main)
