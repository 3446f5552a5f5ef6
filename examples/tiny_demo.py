"""A five-minute tour on a tiny random LLaVA: nothing to download, every result checked against transformers.

    python examples/tiny_demo.py [--workdir /tmp/llava_tiny_demo]

1. builds a tiny random `LlavaForConditionalGeneration` with transformers and a sentencepiece tokenizer
   trained on the spot, and saves them as a llava-hf checkpoint directory;
2. loads it with `llava_jax.load`, prepares a prompt with an image drawn with Pillow, and compares the
   logits and a greedy continuation with transformers';
3. converts it to an orbax model directory and chats with the converted model (random weights: the
   answer is gibberish, but it is the same gibberish transformers would produce).
Prints a JSON summary on its last line.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw

import llava_jax
from llava_jax.convert import convert
from llava_jax.data import tiny_tokenizer


def build_checkpoint(directory: str) -> transformers.LlavaForConditionalGeneration:
    tiny_tokenizer.write_llava_hf_tokenizer(directory, tiny_tokenizer.train_sentencepiece(tiny_tokenizer.corpus()),
                                            added_tokens=("<image>", "<pad>"))  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=56, patch_size=14),
        text_config=transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        directory
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/llava_tiny_demo")
    args = parser.parse_args()
    hf_dir, jax_dir = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "jax")
    hf_model = build_checkpoint(hf_dir)

    image = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(image).ellipse((20, 10, 60, 50), fill="red")
    pipe = llava_jax.load(hf_dir, dtype="float32")
    inputs = pipe.prepare("USER: <image>\nWhat shape is this? ASSISTANT:", [image])
    ours = pipe.logits(**inputs)
    with torch.no_grad():
        torch_inputs = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items() if k != "image_sizes"}
        theirs = hf_model(**torch_inputs).logits.numpy()
        hf_ids = hf_model.generate(**torch_inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    our_ids = pipe.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=16)[0]  # stops at eos too

    if not os.path.exists(os.path.join(jax_dir, "llava_jax.json")):
        convert(hf_dir, jax_dir, dtype="float32", progress=False)
    converted = llava_jax.load(jax_dir, dtype="float32")
    answer = converted.chat("What shape is this?", [image], template="vicuna_v1", max_new_tokens=16)
    print(f"chat answer (random weights): {answer!r}")
    print(json.dumps({
        "max_abs_logit_diff_vs_transformers": float(np.abs(ours - theirs).max()),
        "greedy_tokens_equal_transformers": our_ids == hf_ids.tolist(),
        "image_tokens": int((inputs["input_ids"] == pipe.config.image_token_id).sum()),
        "checkpoint": hf_dir, "converted": jax_dir,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
