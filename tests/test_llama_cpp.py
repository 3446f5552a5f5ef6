"""llama.cpp as the judge of `convert --to gguf`: it loads our exported language model and gives our
text-only logits (float tolerance) and our greedy tokens; it loads the exported mmproj too.

Slow and optional: needs llama-cpp-python, which builds llama.cpp from source (about 27 minutes on 2
cores; FACTS.md):
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        pip install llama-cpp-python==0.3.36
    python -m pytest -m slow tests/test_llama_cpp.py
"""

import numpy as np
import pytest

import llava_jax
from llava_jax.convert import export_gguf
from tests.test_gguf_export import source  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow  # llama-cpp-python builds from source in ~27 min: not a default-run dependency

NEW = 16


def llama(model_path: str):
    import llama_cpp

    return llama_cpp.Llama(model_path=model_path, n_ctx=256, n_batch=256, logits_all=True, verbose=False, seed=0,
                           n_threads=2)  # fmt: skip


def prompt(llm, pipe, rng):
    text = "USER: what colour is the " + " ".join(rng.choice(["red", "blue", "green", "circle", "square"], 8))
    ids = llm.tokenize(text.encode(), add_bos=True)
    return text, ids


def llama_cpp_greedy(llm, ids, n):
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        generated.append(int(token))
        if len(generated) == n:
            return generated


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], np.float32)


def test_llama_cpp_gives_our_logits_and_greedy_tokens(source, tmp_path):  # noqa: F811
    """float32 export: llama.cpp's logits within float tolerance of ours, the same greedy tokens."""
    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype="f32")
    pipe = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32")
    llm = llama(summary["model"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        text, ids = prompt(llm, pipe, rng)
        assert ids == pipe.tokenizer.encode(text), text  # the exported vocabulary tokenizes as ours
        theirs, ours = llama_cpp_logits(llm, ids), pipe.logits(np.array([ids], np.int32))[0]
        worst = max(worst, float(np.abs(theirs - ours).max()))
        np.testing.assert_allclose(theirs, ours, atol=5e-3)
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
        assert llama_cpp_greedy(llm, ids, NEW) == pipe.generate([ids], max_new_tokens=NEW, eos_ids=())[0]
    print(f"llama.cpp f32: max |logit difference| {worst:.2e}")


def test_llama_cpp_runs_our_q8_0_export_as_we_read_it(source, tmp_path):  # noqa: F811
    """q8_0 export read back quantized (quantize="auto"): llama.cpp also rounds the activations to 8-bit
    blocks, so logits agree to ~0.1 and argmax wherever the top-2 margin exceeds that."""
    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype="q8_0")
    pipe = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32", quantize="auto")
    llm = llama(summary["model"])
    rng = np.random.default_rng(0)
    worst, decided = 0.0, 0
    for _ in range(3):
        text, ids = prompt(llm, pipe, rng)
        theirs, ours = llama_cpp_logits(llm, ids), pipe.logits(np.array([ids], np.int32))[0]
        worst = max(worst, float(np.abs(theirs - ours).max()))
        np.testing.assert_allclose(theirs, ours, atol=0.2)
        top2 = np.sort(ours, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.4
        assert (theirs.argmax(-1) == ours.argmax(-1))[clear].all()
        decided += clear.sum()
    assert decided >= 10
    print(f"llama.cpp q8_0: max |logit difference| {worst:.2e}")


def test_llama_cpp_loads_the_exported_mmproj(source, tmp_path):  # noqa: F811
    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    from tests.reference import image

    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype="f16")
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
