"""llama.cpp as the judge of `convert --to gguf`: it loads our exported language model and gives our
text-only logits (float tolerance) and our greedy tokens; it loads the exported mmproj too.

Slow and optional: needs llama-cpp-python, which builds llama.cpp from source (about 27 minutes on 2
cores; FACTS.md):
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" pip install llama-cpp-python==0.3.36
    python -m pytest -m slow tests/test_llama_cpp.py
"""

import numpy as np
import pytest

import llava_jax
from llava_jax.convert import export_gguf
from tests.test_gguf_export import source  # noqa: F401  (the fixture)

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

NEW = 16


def llama(model_path: str):
    return llama_cpp.Llama(model_path=model_path, n_ctx=256, n_batch=256, logits_all=True, verbose=False, seed=0,
                           n_threads=2)  # fmt: skip


def prompt(llm, pipe, rng):
    text = "USER: what colour is the " + " ".join(rng.choice(["red", "blue", "green", "circle", "square"], 8))
    ids = llm.tokenize(text.encode(), add_bos=True)
    return text, ids


@pytest.mark.parametrize("outtype, atol", [("f32", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_gives_our_logits_and_greedy_tokens(source, tmp_path, outtype, atol):  # noqa: F811
    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype)
    # ours: the exported file read back (q8_0: kept quantized; llama.cpp also quantizes activations to 8 bits)
    pipe = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32")
    llm = llama(summary["model"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        text, ids = prompt(llm, pipe, rng)
        assert ids == pipe.tokenizer.encode(text), text  # the exported vocabulary tokenizes as ours
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], np.float32)
        ours = pipe.logits(np.array([ids], np.int32))[0]
        worst = max(worst, float(np.abs(theirs - ours).max()))
        np.testing.assert_allclose(theirs, ours, atol=atol)
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
        llm.reset()
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            generated.append(int(token))
            if len(generated) == NEW:
                break
        assert generated == pipe.generate([ids], max_new_tokens=NEW, eos_ids=())[0]
    print(f"llama.cpp {outtype}: max |logit difference| {worst:.2e}")


def test_llama_cpp_loads_the_exported_mmproj(source, tmp_path):  # noqa: F811
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from tests.reference import image

    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), "f16")
    picture = tmp_path / "picture.png"
    image((40, 30), 1).save(picture)
    handler = Llava15ChatHandler(clip_model_path=summary["mmproj"], verbose=False)
    llm = llama_cpp.Llama(model_path=summary["model"], chat_handler=handler, n_ctx=256, verbose=False, seed=0)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture.as_uri()}},
                                               {"type": "text", "text": "What is it?"}]}],
        max_tokens=4, temperature=0.0,
    )  # fmt: skip
    assert reply["usage"]["prompt_tokens"] > 16  # the image's 16 tokens were embedded
