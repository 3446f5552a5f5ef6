"""Peak memory of converting a 7B llava-hf checkpoint (random bfloat16 weights) to an orbax model dir.

    python bench/convert_memory.py --workdir /tmp/convert7b [--preset llava-1.5-7b]

Writes a llava-hf directory in the published key layout (sharded safetensors, ~14 GB), then runs
`python -m llava_jax.convert --dtype bfloat16` in a subprocess and reports its peak resident memory
(ru_maxrss) and time as a JSON line.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from llava_jax.checkpoints.hf import hf_rules
from llava_jax.checkpoints.safetensors_io import write_safetensors
from llava_jax.config import preset
from llava_jax.pipeline import abstract_model
from llava_jax.checkpoints.params import flat_variables


def hub_key(key: str) -> str:
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):  # fmt: skip
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def write_random_checkpoint(directory: str, name: str, shard_bytes: int = 2 << 30) -> None:
    cfg = preset(name)
    _, abstract = abstract_model(cfg)
    shapes = flat_variables(abstract)
    rng = np.random.default_rng(0)
    entries = []
    for rule in hf_rules(cfg):
        shape = shapes[rule.path].shape
        per_layer = shape[1:] if rule.stacked else shape
        file_shape = rule.to_file(np.empty(per_layer, np.int8)).shape  # layout only
        for key in rule.keys(shape[0] if rule.stacked else 1):
            entries.append((hub_key(key), file_shape))

    def produce(shape):
        return lambda: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

    shards, current, size = [], {}, 0
    for key, shape in entries:
        current[key] = (shape, ml_dtypes.bfloat16, produce(shape))
        size += int(np.prod(shape)) * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), tensors, {"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    t, v = cfg.text, cfg.vision
    hf_config = {
        "model_type": "llava", "image_token_index": cfg.image_token_id, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
                        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
                        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
                          "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size},
    }  # fmt: skip
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--preset", default="llava-1.5-7b")
    args = parser.parse_args()
    src, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "jax")
    if not os.path.exists(os.path.join(src, "config.json")):
        t = time.time()
        write_random_checkpoint(src, args.preset)
        print(f"wrote {src} in {time.time() - t:.0f}s", file=sys.stderr)
    checkpoint_bytes = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src) if n.endswith(".safetensors"))
    t = time.time()
    subprocess.run([sys.executable, "-m", "llava_jax.convert", f"--src={src}", f"--out={out}", "--dtype=bfloat16"],
                   check=True)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"preset": args.preset, "checkpoint_gb": round(checkpoint_bytes / 1e9, 2),
                      "convert_peak_rss_gb": round(peak / 1e9, 2), "convert_seconds": round(time.time() - t)}))  # fmt: skip


if __name__ == "__main__":
    main()
