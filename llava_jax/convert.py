"""Converts a checkpoint into a llava_jax model directory (orbax parameters + config + tokenizer).

    python -m llava_jax.convert --src llava-1.5-7b-hf --out llava15-7b-jax [--dtype bfloat16]
    python -m llava_jax.convert --src llava-v1.5-7b --vision_tower clip-vit-large-patch14-336 --out ...
    python -m llava_jax.convert --src llava-v1.5-7b-Q4_K_M.gguf --mmproj mmproj-model-f16.gguf --out ...
    python -m llava_jax.convert --src llava-1.5-7b-hf --out llava15-7b-int8 --quantize int8
    python -m llava_jax.convert --src llava15-7b-jax --out gguf-dir --to gguf --outtype q8_0

Tensors are read one at a time and cast to --dtype, so a 7B checkpoint converts to bfloat16 within
about 16 GB of memory. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
from absl import app, flags, logging
from flax import nnx

from llava_jax import quant
from llava_jax.chat import checkpoint_template
from llava_jax.checkpoints import orbax
from llava_jax.pipeline import checkpoint_kind, load_model, side_directory

_SRC = flags.DEFINE_string("src", None, "llava-hf or original LLaVA checkpoint directory, or a GGUF language model.")
_VISION_TOWER = flags.DEFINE_string("vision_tower", None, "Original LLaVA only: the CLIP directory "
                                    "(default: config.json's mm_vision_tower).")  # fmt: skip
_MMPROJ = flags.DEFINE_string("mmproj", None, "GGUF only: the multimodal projector file of --src.")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not hold a model yet.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter dtype to store.")
_TO = flags.DEFINE_enum("to", "llava_jax", ["llava_jax", "gguf"],
                        "Output format: a llava_jax model directory, or the GGUF pair llama.cpp reads "
                        "(DIR/model-OUTTYPE.gguf + DIR/mmproj-model-f16.gguf).")  # fmt: skip
_OUTTYPE = flags.DEFINE_enum("outtype", "f16", ["f32", "f16", "q8_0"], "--to gguf: the language model's weight type.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4", "auto"],
                              "Store the decoder's linear layers quantized (llava_jax.quant); 'auto' keeps a GGUF "
                              "file's Q8_0/Q4_0 tensors as they are.")  # fmt: skip


def convert(src: str, out: str, dtype: str = "bfloat16", progress: bool = True,
            vision_tower: str | None = None, mmproj: str | None = None,
            quantize: str | None = None) -> dict:  # fmt: skip
    start = time.time()
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("--out must differ from --src")
    kind = checkpoint_kind(src)
    if kind == "llava_jax":
        raise ValueError(f"{src} is already a llava_jax model directory")
    model, config = load_model(src, dtype=dtype, progress=progress, vision_tower=vision_tower, mmproj=mmproj,
                               quantize=quantize)  # fmt: skip
    state = nnx.state(model)
    orbax.save_model_dir(out, state, config, copy_from=None if kind == "gguf" else src,
                         template=checkpoint_template(src, config),
                         quantization=quant.plan_to_json(quant.model_plan(model)))  # fmt: skip
    if kind == "gguf":
        write_gguf_side_files(src, mmproj, out)
    preprocessor = os.path.join(side_directory(src, vision_tower), "preprocessor_config.json")
    if not os.path.exists(os.path.join(out, "preprocessor_config.json")) and os.path.isfile(preprocessor):
        shutil.copy2(preprocessor, out)  # an original checkpoint's lives in its CLIP directory
    n_params = sum(x.size for x in jax.tree.leaves(state))
    return {"src": src, "out": out, "dtype": dtype, "quantize": quantize, "parameters": int(n_params),
            "bytes": quant.parameter_bytes(state), "seconds": round(time.time() - start, 1)}  # fmt: skip


def export_gguf(src: str, out: str, outtype: str = "f16", dtype: str = "float32", vision_tower: str | None = None,
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


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("--src and --out are required")
    if _TO.value == "gguf":
        if _QUANTIZE.value:
            raise app.UsageError("--quantize is for --to llava_jax; GGUF's own types come from --outtype")
        dtype = _DTYPE.value if _DTYPE.present else "float32"
        print(json.dumps(export_gguf(_SRC.value, _OUT.value, _OUTTYPE.value, dtype, vision_tower=_VISION_TOWER.value,
                                     mmproj=_MMPROJ.value)))  # fmt: skip
        return
    print(json.dumps(convert(_SRC.value, _OUT.value, _DTYPE.value, vision_tower=_VISION_TOWER.value,
                             mmproj=_MMPROJ.value, quantize=_QUANTIZE.value)))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
