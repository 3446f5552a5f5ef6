"""Ask a LLaVA model about images; the answer is streamed as it is generated.

    python infer.py --model DIR --image cat.jpg --prompt "What is in the picture?"
    python infer.py --model DIR --image cat.jpg            # interactive multi-turn chat
    python infer.py --model llava-v1.5-7b-Q4_K.gguf --mmproj mmproj-model-f16.gguf --image cat.jpg

--model: what `llava_jax.load` reads: a llava-hf directory, an original LLaVA directory, a
directory written by `python -m llava_jax.convert`, or a llama.cpp GGUF language model (its
projector via --mmproj; or a directory holding the two .gguf files). With
--prompt, the last line printed is a JSON summary. Without it, each line typed is a turn (the
conversation and the images' features are kept); an empty line or end of input ends the chat.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags

from llava_jax.errors import UserError, one_line, run_app

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "checkpoint: a llava-hf, original LLaVA or llava_jax directory, or a llama.cpp "
                    "GGUF language model (.gguf, with --mmproj)", required=True)  # fmt: skip
flags.DEFINE_string("mmproj", None, "GGUF only: the multimodal projector file (mmproj-*.gguf) of --model")
flags.DEFINE_multi_string("image", [], "image file; repeat for several images (one per <image> tag)")
flags.DEFINE_string("prompt", None, "the question; without it, an interactive chat")
flags.DEFINE_string("template", "auto", "conversation template (vicuna_v1, llava_v1, mistral_instruct, "
                    "chatml_direct, ...); auto: the one the original LLaVA CLI picks for the model")  # fmt: skip
flags.DEFINE_float("temperature", 0.2, "sampling temperature; 0 = greedy")
flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 1.0, "sample from the smallest set of tokens whose probability reaches p")
flags.DEFINE_integer("max_new_tokens", 512, "most tokens per answer")
flags.DEFINE_integer("seed", 0, "sampling seed (the same seed gives the same answer)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "parameters and activations")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "auto"], "weight-only quantization of the decoder's linear "
                  "layers (llava_jax.quant); 'auto' keeps a GGUF file's Q8_0/Q4_0 tensors as they are")  # fmt: skip

def answer(session, prompt: str, sampling: dict, out=sys.stdout) -> dict:
    """Streams one reply to `out`; returns its summary."""
    start = time.perf_counter()
    for piece in session.ask_stream(prompt, **sampling):
        out.write(piece)
        out.flush()
    out.write("\n")
    reply = session.messages[-1]["content"]
    return {"answer": reply, "seconds": round(time.perf_counter() - start, 3)}


def main(argv):
    del argv
    import llava_jax
    from llava_jax.chat import ChatSession

    sampling = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                    max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed)  # fmt: skip
    from llava_jax.data.image import load_image

    images = [load_image(path) for path in FLAGS.image]  # fail on a bad image before loading the model
    pipe = llava_jax.load(FLAGS.model, dtype=FLAGS.dtype, mmproj=FLAGS.mmproj, quantize=FLAGS.quantize)
    session = ChatSession(pipe, images, None if FLAGS.template == "auto" else FLAGS.template)
    if FLAGS.prompt is not None:
        summary = answer(session, FLAGS.prompt, sampling)
        print(json.dumps({"template": session.template, **summary}))
        return
    print(f"Chatting with {FLAGS.model} ({len(images)} image(s), template {session.template}); "
          "an empty line ends.", file=sys.stderr)  # fmt: skip
    while True:
        try:
            prompt = input("USER: ")
        except EOFError:
            break
        if not prompt.strip():
            break
        sys.stdout.write("ASSISTANT: ")
        try:
            answer(session, prompt, sampling)
        except UserError as e:  # e.g. a turn longer than the context: report it and keep chatting
            print(f"\n{one_line(e)}", file=sys.stderr)

if __name__ == "__main__":
    run_app(main)
