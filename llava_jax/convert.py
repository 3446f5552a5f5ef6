"""Converts a checkpoint into a llava_jax model directory (orbax parameters + config + tokenizer).

    python -m llava_jax.convert --src llava-1.5-7b-hf --out llava15-7b-jax [--dtype bfloat16]

Tensors are read one at a time and cast to --dtype, so a 7B checkpoint converts to bfloat16 within
about 16 GB of memory. The last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from flax import nnx

from llava_jax.checkpoints import orbax
from llava_jax.pipeline import checkpoint_kind, load_model

_SRC = flags.DEFINE_string("src", None, "llava-hf checkpoint directory (single or sharded safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not hold a model yet.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter dtype to store.")


def convert(src: str, out: str, dtype: str = "bfloat16", progress: bool = True) -> dict:
    start = time.time()
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("--out must differ from --src")
    if checkpoint_kind(src) == "llava_jax":
        raise ValueError(f"{src} is already a llava_jax model directory")
    model, config = load_model(src, dtype=dtype, progress=progress)
    state = nnx.state(model)
    orbax.save_model_dir(out, state, config, copy_from=src)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    return {"src": src, "out": out, "dtype": dtype, "parameters": int(n_params), "seconds": round(time.time() - start, 1)}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("--src and --out are required")
    print(json.dumps(convert(_SRC.value, _OUT.value, _DTYPE.value)))


if __name__ == "__main__":
    app.run(main)
