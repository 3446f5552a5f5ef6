"""llama.cpp as the judge of `convert --to gguf`: it loads our exported language model and gives our
text-only logits (float tolerance) and our greedy tokens; its clip encoder (libmtmd) gives our image features
from the exported mmproj, in its own token order (llama.cpp issue #25814); its LLaVA-1.5 chat handler runs the pair.

Slow and optional: needs llama-cpp-python, which builds llama.cpp from source (about 27 minutes on 2
cores; FACTS.md):
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        pip install llama-cpp-python==0.3.36
    python -m pytest -m slow tests/test_llama_cpp.py
"""

import jax.numpy as jnp
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


def llama_cpp_image_embeddings(llm, mmproj: str, picture) -> np.ndarray:
    """llama.cpp's projected image embeddings [tokens, D] of a PIL image, through libmtmd (what
    llama-mtmd-cli runs: its own preprocessing, the clip graph, the projector)."""
    import ctypes

    from llama_cpp import mtmd_cpp as M

    params = M.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, 2, False
    ctx = M.mtmd_init_from_file(mmproj.encode(), llm.model, params)
    assert ctx, f"llama.cpp could not load {mmproj}"
    rgb = np.asarray(picture.convert("RGB"), np.uint8)
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(M.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data))
    text = M.mtmd_input_text()
    text.text = M.mtmd_default_marker()
    text.text_len, text.add_special, text.parse_special = len(text.text), False, True
    chunks = M.mtmd_input_chunks_init()
    try:
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        images = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        n = M.mtmd_input_chunk_get_n_tokens(images[0])
        assert M.mtmd_encode_chunk(ctx, images[0]) == 0
        embd = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),))
        return embd.reshape(n, llm.n_embd()).copy()
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmaps[0])
        M.mtmd_free(ctx)


def cls_last_features(pipe, pixel_values) -> np.ndarray:
    """Our image features [tokens, D] computed as llama.cpp 0.3.36's llava graph computes them: the class
    embedding concatenated after the patches, position rows 0..P added in that order, and rows 1..P kept
    (llama.cpp issue #25814, fix proposed in PR #25844). The same weights, only the token order differs."""
    from flax import nnx

    model = nnx.merge(pipe._graphdef, pipe._state)
    tower = model.vision

    def embed(pixels):
        c, size, p = tower.cfg.num_channels, tower.cfg.image_size, tower.cfg.patch_size
        x = pixels.reshape(len(pixels), c, size // p, p, size // p, p)
        d = tower.cfg.hidden_size
        patches = jnp.einsum("nchpwq,pqcd->nhwd", x, tower.patch_embed[...]).reshape(len(pixels), -1, d)
        cls = jnp.broadcast_to(tower.class_embed[...], (len(pixels), 1, d))
        return tower.pre_norm(jnp.concatenate([patches, cls], axis=1) + tower.pos_embed[...])

    tower.embed = embed  # this merged copy only
    return np.asarray(model.image_features(jnp.asarray(pixel_values)), np.float32)


def test_llama_cpp_encodes_images_with_our_weights(source, tmp_path):  # noqa: F811
    """float32 export, an image already at the tower's size (both sides' resizing keeps its pixels):
    llama.cpp's clip + projector (libmtmd) give our features computed in its token order, to float
    tolerance; so the tower, feature layer, projector and image normalisation were all exported exactly.
    llama.cpp 0.3.36 puts the class token last (issue #25814), so its image tokens are not ours."""
    from tests.reference import image

    directory, _, _ = source
    summary = export_gguf(directory, str(tmp_path), outtype="f32")
    pipe = llava_jax.load(summary["model"], mmproj=summary["mmproj"], dtype="float32")
    size = pipe.config.vision.image_size
    llm = llama(summary["model"])
    for seed in (1, 2):
        picture = image((size, size), seed)
        theirs = llama_cpp_image_embeddings(llm, summary["mmproj"], picture)
        pixels = pipe.prepare("<image>", [picture])["pixel_values"]
        ours = np.asarray(pipe._compute_image_features(pixels, None)[0], np.float32)
        as_llama_cpp = cls_last_features(pipe, pixels)
        assert theirs.shape == ours.shape == (pipe.config.tokens_per_tile, pipe.config.text.hidden_size)
        np.testing.assert_allclose(theirs, as_llama_cpp, atol=2e-3 * np.abs(ours).max())  # ggml's f16 GELU table
        assert np.abs(theirs - ours).max() > 0.1 * np.abs(ours).max()  # the defect is there: fails once fixed
        print(f"llama.cpp image embeddings: max |difference| {np.abs(theirs - as_llama_cpp).max():.2e} from ours "
              f"in its token order (largest value {np.abs(ours).max():.2f})")  # fmt: skip


def test_llama_cpp_chats_with_the_exported_f16_mmproj(source, tmp_path):  # noqa: F811
    """The f16 pair through llama-cpp-python's LLaVA-1.5 chat handler: the image's tokens are embedded."""
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
