"""pipe.prepare against transformers' LlavaNextProcessor / LlavaProcessor and the original tokenizer_image_token.

The tokenizer is a sentencepiece BPE trained here (LLaMA's settings) and loaded with transformers; a
thin adapter gives it the interface of `llava_jax.data.tokenizer` (encode with BOS, bos_id, ...), so
both sides tokenize identically and what is compared is the image-token expansion. The last test
runs `llava_jax.load` with the project's own tokenizer where that module is present.
"""

import io
import json
import random

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from PIL import Image

import llava_jax
from llava.mm_utils import tokenizer_image_token
from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data.image import ImageProcessor
from llava_jax.data.prepare import ImageCountError, PromptTooLong, prepare_inputs
from llava_jax.model import anyres
from tests import reference as R

transformers.logging.set_verbosity_error()

VOCAB = 320  # sentencepiece pieces; "<image>" is added as id 320
IMAGE_ID = 320
TEXT = "A chat. USER: <image>\nWhat is the color of the circle? And here: <image> ASSISTANT:"
WORDS = "the a of in on is what how many color shape image red green blue circle square left right here and".split()


def image(size_hw, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size_hw, 3), dtype=np.uint8))


IMAGES = [image((20, 70), 1), image((90, 30), 2)]


def write_tokenizer(directory, with_image_token: bool):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS + ["USER:", "ASSISTANT:", "chat."]) for _ in range(rng.randint(3, 12)))
             for _ in range(300)]  # fmt: skip
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    if with_image_token:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
        tokenizer.save_pretrained(str(directory))
    return tokenizer


class Adapter:
    """`llava_jax.data.tokenizer`'s interface over a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(self, text):
        return self.tokenizer(text).input_ids

    def decode(self, ids):
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), with_image_token=True)


@pytest.fixture(scope="module")
def original_tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok_original"), with_image_token=False)


@pytest.fixture(scope="module")
def next_model():
    return R.build_llava(R.llava_next_hf_config(text=dict(vocab_size=VOCAB + 2), image_token_index=IMAGE_ID))


def next_processor(tokenizer):
    return transformers.LlavaNextProcessor(image_processor=R.next_image_processor(), tokenizer=tokenizer, patch_size=7,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


def test_prepare_equals_llava_next_processor_and_runs_to_the_same_logits(next_model, hf_tokenizer, tmp_path):
    pipe = llava_jax.load(R.save(next_model, str(tmp_path)), dtype="float32")
    pipe.tokenizer = Adapter(hf_tokenizer)
    ours = pipe.prepare(TEXT, IMAGES)
    theirs = next_processor(hf_tokenizer)(images=IMAGES, text=TEXT, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
    np.testing.assert_array_equal(ours["image_sizes"], theirs["image_sizes"])
    counts = [anyres.num_image_tokens(pipe.config, s) for s in ours["image_sizes"]]
    assert (ours["input_ids"] == IMAGE_ID).sum() == sum(counts) and counts[0] != counts[1]
    ref = R.reference_logits(next_model, theirs["input_ids"], theirs["pixel_values"],
                             attention_mask=theirs["attention_mask"], image_sizes=torch.as_tensor(theirs["image_sizes"]))  # fmt: skip
    np.testing.assert_allclose(pipe.logits(**ours), ref, atol=1e-4, rtol=0)


def test_prepare_equals_llava_processor(hf_tokenizer):
    config = LlavaConfig.from_hf(R.llava_hf_config(text=dict(vocab_size=VOCAB + 2), image_token_index=IMAGE_ID).to_dict())
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=hf_tokenizer, patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    ours = prepare_inputs(TEXT, IMAGES, tokenizer=Adapter(hf_tokenizer), image_processor=ImageProcessor.from_config(config),
                          config=config)  # fmt: skip
    theirs = processor(images=IMAGES, text=TEXT, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"])
    assert (ours["input_ids"] == IMAGE_ID).sum() == 2 * 16
    text_only = prepare_inputs("USER: hello ASSISTANT:", tokenizer=Adapter(hf_tokenizer), image_processor=None,
                               config=config)  # fmt: skip
    assert text_only["pixel_values"] is None and text_only["image_sizes"] is None
    np.testing.assert_array_equal(text_only["input_ids"], processor(text="USER: hello ASSISTANT:", return_tensors="np")["input_ids"])


def original_config(**changes):
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=28, patch_size=7),
        image_aspect_ratio="anyres", image_grid_pinpoints=tuple(map(tuple, R.PINPOINTS)), patch_merge_type="spatial_unpad",
        semantics="original", image_token_id=VOCAB,  # original: vocab_size, here also the <image> id of the hf tokenizer
    ).replace(**changes)  # fmt: skip


@pytest.mark.parametrize("text", [TEXT, "<image>\nDescribe it. <image>", "USER: compare <image><image>"])
def test_original_prepare_equals_tokenizer_image_token(original_tokenizer, text):
    """The original tokenizes the pieces between <image>s one by one (each gets a leading "▁") and puts
    one -200 per image; pipe.prepare puts the image's tokens there."""
    config = original_config()
    ours = prepare_inputs(text, IMAGES, tokenizer=Adapter(original_tokenizer),
                          image_processor=ImageProcessor.from_config(config), config=config)  # fmt: skip
    counts = iter(anyres.num_image_tokens(config, s) for s in ours["image_sizes"])
    expected = []
    for token in tokenizer_image_token(text, original_tokenizer):
        expected += [VOCAB] * next(counts) if token == -200 else [token]
    assert ours["input_ids"][0].tolist() == expected
    assert next(counts, None) is None


def test_the_two_tokenizations_differ_after_an_image(hf_tokenizer):
    """Why the original's rule matters: after an image its text starts a new sentencepiece text."""
    config, tok = original_config(), Adapter(hf_tokenizer)
    kwargs = dict(tokenizer=tok, image_processor=ImageProcessor.from_config(config))
    original = prepare_inputs("USER: <image>\nWhat", IMAGES[:1], config=config, **kwargs)["input_ids"][0]
    hf = prepare_inputs("USER: <image>\nWhat", IMAGES[:1], config=config.replace(semantics="hf"), **kwargs)["input_ids"][0]
    space = hf_tokenizer.convert_tokens_to_ids("▁")
    after_original, after_hf = original[original != IMAGE_ID], hf[hf != IMAGE_ID]
    assert len(after_original) == len(after_hf) + 1 and space in after_original[-4:].tolist()


# -- bad input --------------------------------------------------------------------------------------


def test_wrong_number_of_images(hf_tokenizer):
    config = original_config().replace(semantics="hf")
    kwargs = dict(tokenizer=Adapter(hf_tokenizer), image_processor=ImageProcessor.from_config(config), config=config)
    with pytest.raises(ImageCountError, match="the text has 2 <image> tags but 1 images were given"):
        prepare_inputs(TEXT, IMAGES[:1], **kwargs)
    with pytest.raises(ImageCountError, match="the text has 0 <image> tags but 2 images"):
        prepare_inputs("no tags", IMAGES, **kwargs)
    with pytest.raises(ImageCountError, match="the text has 1 <image> tags but 0 images"):
        prepare_inputs("USER: <image>", **kwargs)


def test_tokenizer_without_the_image_token(original_tokenizer):
    config = original_config().replace(semantics="hf")
    with pytest.raises(ImageCountError, match="into 0 image tokens .* must hold <image> as an added token"):
        prepare_inputs(TEXT, IMAGES, tokenizer=Adapter(original_tokenizer),
                       image_processor=ImageProcessor.from_config(config), config=config)  # fmt: skip


def test_prompt_longer_than_the_model_was_trained_on(original_tokenizer):
    config = original_config(model_max_length=50)
    with pytest.raises(PromptTooLong, match=r"the prompt is \d+ tokens \(\d+ of them image tokens\), longer than the 50"):
        prepare_inputs(TEXT, IMAGES, tokenizer=Adapter(original_tokenizer),
                       image_processor=ImageProcessor.from_config(config), config=config)  # fmt: skip


def test_pipeline_without_tokenizer(tmp_path):
    pipe = llava_jax.load(R.save(R.build_llava(R.llava_hf_config()), str(tmp_path)), dtype="float32")
    assert pipe.tokenizer is None and pipe.image_processor is not None
    with pytest.raises(ValueError, match="this Pipeline has no tokenizer"):
        pipe.prepare("USER: <image>", IMAGES[:1])


def test_load_reads_the_checkpoints_tokenizer_and_prepares_like_llava_next_processor(next_model, hf_tokenizer, tmp_path):
    directory = R.save(next_model, str(tmp_path))
    hf_tokenizer.save_pretrained(directory)
    pipe = llava_jax.load(directory, dtype="float32")
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    theirs = next_processor(reference)(images=IMAGES, text=TEXT, return_tensors="np")
    np.testing.assert_array_equal(pipe.prepare(TEXT, IMAGES)["input_ids"], theirs["input_ids"])


def test_load_reads_an_original_checkpoints_tokenizer_and_prepares_like_tokenizer_image_token(original_tokenizer,
                                                                                             tmp_path):  # fmt: skip
    from tests.original_reference import write_clip_dir, write_original

    hf_model = R.build_llava(R.llava_next_hf_config(text=dict(vocab_size=VOCAB)))
    clip = write_clip_dir(str(tmp_path / "clip"), hf_model.model.vision_tower, 28)
    directory = write_original(str(tmp_path / "orig"), hf_model, clip, image_aspect_ratio="anyres",
                               mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=R.PINPOINTS)  # fmt: skip
    original_tokenizer.save_pretrained(directory)
    pipe = llava_jax.load(directory, dtype="float32")
    assert pipe.config.image_token_id == VOCAB
    ours = pipe.prepare(TEXT, IMAGES)
    counts = iter(anyres.num_image_tokens(pipe.config, s) for s in ours["image_sizes"])
    expected = []
    for token in tokenizer_image_token(TEXT, transformers.AutoTokenizer.from_pretrained(directory)):
        expected += [VOCAB] * next(counts) if token == -200 else [token]
    assert ours["input_ids"][0].tolist() == expected
