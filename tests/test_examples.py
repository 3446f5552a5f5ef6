"""Training examples: ids as the original tokenizer_image_token, labels on exactly the replies + end marker."""

import itertools

import numpy as np
import pytest
import transformers
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token

from llava_jax.data.examples import IGNORE_INDEX, BadRecord, ExampleBuilder, FixedImageTokens, record_messages

NUM_IMAGE_TOKENS = 5

MULTI_TURN = {
    "id": "multi",
    "image": "shapes/001.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "The circle is red."},
        {"from": "human", "value": "And the square?"},
        {"from": "gpt", "value": "Blue, next to\nthe 3 triangles."},
        {"from": "human", "value": "How many stars?"},
        {"from": "gpt", "value": "2"},
    ],
}
TEXT_ONLY = {
    "id": "text",
    "conversations": [
        {"from": "human", "value": "Say hello."},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Again, in two words?"},
        {"from": "gpt", "value": "Hello there."},
    ],
}
CAPTION = {
    "id": "caption",
    "image": "shapes/002.jpg",
    "conversations": [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "a red circle left of 2 blue squares"},
    ],
}


# The end-of-turn text each original preprocess function supervises after a reply, from its template.
def _end_marker(name):
    conv = conv_templates[name]
    style = conv.sep_style.name
    return {"TWO": conv.sep2, "LLAMA_2": f" {conv.sep2}"}.get(style, conv.sep)  # MPT, PLAIN: sep


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _builder(tokenizer, template, **kwargs):
    return ExampleBuilder(
        tokenizer=tokenizer,
        template=template,
        image_token_id=tokenizer.token_to_id("<image>"),
        num_image_tokens=FixedImageTokens(NUM_IMAGE_TOKENS),
        **kwargs,
    )


def _supervised_runs(example):
    """The supervised ids as contiguous runs, and checks labels equal input_ids there."""
    ids, labels = example["input_ids"], example["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    on = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[on], ids[on])
    runs, current = [], []
    for token, supervised in zip(ids.tolist(), on.tolist()):
        if supervised:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def _original_input_ids(name, record, reference_tokenizer, image_token_id):
    """What the original builds: conv.get_prompt() through tokenizer_image_token, <image> expanded."""
    conv = conv_templates[name].copy()
    conv.messages = []
    for turn in record["conversations"]:
        conv.append_message(conv.roles[turn["from"] == "gpt"], turn["value"])
    ids = tokenizer_image_token(conv.get_prompt(), reference_tokenizer, image_token_index=-200)
    return [t for i in ids for t in ([image_token_id] * NUM_IMAGE_TOKENS if i == -200 else [i])]


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_2"])
@pytest.mark.parametrize("record", [MULTI_TURN, TEXT_ONLY], ids=["image", "text"])
def test_replies_and_end_marker_are_exactly_what_is_supervised(tokenizer, reference_tokenizer, name, record):
    sizes = [(480, 640)] if "image" in record else []
    example = _builder(tokenizer, name)(record, sizes)
    replies = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    expected = [reply + _end_marker(name) for reply in replies]
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == expected
    image_id = tokenizer.token_to_id("<image>")
    original = _original_input_ids(name, record, reference_tokenizer, image_id)
    assert example["input_ids"].tolist() == original
    assert (example["input_ids"] == image_id).sum() == NUM_IMAGE_TOKENS * len(sizes)


def test_plain_supervises_the_caption_after_the_image(tokenizer, reference_tokenizer):
    example = _builder(tokenizer, "plain")(CAPTION, [(300, 400)])
    caption = CAPTION["conversations"][1]["value"]
    assert [tokenizer.decode(run) for run in _supervised_runs(example)] == [caption + _end_marker("plain")]
    image_id = tokenizer.token_to_id("<image>")
    # preprocess_plain: "<image>" + caption + sep, the question dropped.
    prompt = "<image>" + caption + conv_templates["plain"].sep
    original = tokenizer_image_token(prompt, reference_tokenizer, image_token_index=-200)
    expanded = [t for i in original for t in ([image_id] * NUM_IMAGE_TOKENS if i == -200 else [i])]
    assert example["input_ids"].tolist() == expanded
    assert example["input_ids"][: 1 + NUM_IMAGE_TOKENS].tolist() == [tokenizer.bos_id] + [image_id] * NUM_IMAGE_TOKENS


def test_single_image_placeholder_moves_to_the_front_of_its_turn(tokenizer):
    turns = [{"from": "human", "value": "Describe  <image> briefly. "}, {"from": "gpt", "value": "A star."}]
    assert record_messages({"conversations": turns}, num_images=1)[0]["content"] == "<image>\nDescribe   briefly."
    # Text-only and multi-image records keep the text as it is.
    assert record_messages({"conversations": turns}, num_images=2)[0]["content"] == turns[0]["value"]
    moved = _builder(tokenizer, "vicuna_v1")({"image": "x.jpg", "conversations": turns}, [(10, 10)])
    front = _builder(tokenizer, "vicuna_v1")(
        {"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe   briefly."}, turns[1]]},
        [(10, 10)],
    )
    np.testing.assert_array_equal(moved["input_ids"], front["input_ids"])


def test_multi_image_records_keep_placeholders_in_place_with_per_image_counts(tokenizer):
    record = {
        "id": "two-images",
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "human", "value": "Compare <image> with <image>: which is larger?"},
            {"from": "gpt", "value": "The second."},
        ],
    }
    image_id = tokenizer.token_to_id("<image>")
    builder = ExampleBuilder(tokenizer, "vicuna_v1", image_id, num_image_tokens=lambda hw: hw[0] // 100)
    ids = builder(record, [(300, 500), (700, 100)])["input_ids"].tolist()
    runs = [len(list(group)) for is_image, group in itertools.groupby(ids, lambda t: t == image_id) if is_image]
    assert runs == [3, 7]
    first = ids.index(image_id)
    assert tokenizer.decode(ids[:first]).endswith("USER: Compare ")
    second = ids.index(image_id, first + 3)
    assert tokenizer.decode(ids[first + 3 : second]) == "with "


def test_leading_gpt_turn_is_dropped(tokenizer):
    record = dict(TEXT_ONLY, conversations=[{"from": "gpt", "value": "Ignored."}] + TEXT_ONLY["conversations"])
    builder = _builder(tokenizer, "vicuna_v1")
    np.testing.assert_array_equal(builder(record)["input_ids"], builder(TEXT_ONLY)["input_ids"])


def test_truncation_keeps_the_head(tokenizer):
    full = _builder(tokenizer, "vicuna_v1")(TEXT_ONLY)
    limit = len(full["input_ids"]) - 3
    cut = _builder(tokenizer, "vicuna_v1", max_length=limit)(TEXT_ONLY)
    np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:limit])
    np.testing.assert_array_equal(cut["labels"], full["labels"][:limit])
    with pytest.raises(BadRecord, match="too_long"):
        _builder(tokenizer, "vicuna_v1", max_length=limit, overlong="skip")(TEXT_ONLY)


@pytest.mark.parametrize(
    "record, sizes, reason",
    [
        ({"id": 1, "conversations": []}, [], "empty_conversation"),
        ({"id": 2, "conversations": [{"from": "gpt", "value": "only me"}]}, [], "empty_conversation"),
        ({"id": 3}, [], "malformed"),
        ({"id": 4, "conversations": [{"from": "human", "value": "hi"}]}, [], "no_reply"),
        (
            {"id": 5, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
            [],
            "empty_reply",
        ),
        ({"id": 6, "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, [], "roles"),
        ({"id": 7, "conversations": [{"from": "bot", "value": "a"}]}, [], "roles"),
        ({"id": 8, "conversations": TEXT_ONLY["conversations"][:2], "image": "x.jpg"}, [(4, 4)], "image_count"),
        ({"id": 9, "conversations": MULTI_TURN["conversations"]}, [], "image_count"),
        ({"id": 10, "image": ["a", "b"], "conversations": MULTI_TURN["conversations"]}, [(1, 1)] * 2, "image_count"),
        ({"id": 11, "image": 7, "conversations": MULTI_TURN["conversations"]}, [], "malformed"),
    ],
)
def test_bad_records_raise_with_a_reason(tokenizer, record, sizes, reason):
    with pytest.raises(BadRecord) as error:
        _builder(tokenizer, "vicuna_v1")(record, sizes)
    assert error.value.reason == reason and error.value.record_id == record["id"]


def test_truncation_never_cuts_an_image_or_leaves_nothing_supervised(tokenizer):
    builder = _builder(tokenizer, "vicuna_v1", max_length=NUM_IMAGE_TOKENS)
    with pytest.raises(BadRecord, match="cut an image"):
        builder(MULTI_TURN, [(1, 1)])
    prompt_only = _builder(tokenizer, "vicuna_v1")(TEXT_ONLY)
    first_reply = int(np.argmax(prompt_only["labels"] != IGNORE_INDEX))
    with pytest.raises(BadRecord, match="nothing supervised is left"):
        _builder(tokenizer, "vicuna_v1", max_length=first_reply)(TEXT_ONLY)


def test_plain_needs_an_image_and_two_turns(tokenizer):
    with pytest.raises(BadRecord, match="image_count"):
        _builder(tokenizer, "plain")(dict(TEXT_ONLY, conversations=TEXT_ONLY["conversations"][:2]))
    with pytest.raises(BadRecord, match="malformed"):
        _builder(tokenizer, "plain")(MULTI_TURN, [(1, 1)])


def test_unsupported_template_and_size_mismatch(tokenizer):
    with pytest.raises(NotImplementedError, match="llava_v0"):
        _builder(tokenizer, "llava_v0")
    with pytest.raises(ValueError, match="1 images but 0 image sizes"):
        _builder(tokenizer, "vicuna_v1")(MULTI_TURN, [])


# -- labels against the original preprocess_* functions ---------------------------------------------

ORIGINAL_TEMPLATES = ["vicuna_v1", "llava_v1", "mistral_instruct", "llava_llama_2"]
DIGIT_REPLY = {
    "id": "digits",
    "image": "x.jpg",
    "conversations": [
        {"from": "gpt", "value": "A leading gpt turn is dropped."},
        {"from": "human", "value": "How many stars?\n<image>"},
        {"from": "gpt", "value": "3"},
        {"from": "human", "value": "And circles?"},
        {"from": "gpt", "value": " 12, maybe."},
    ],
}


@pytest.fixture(scope="module")
def original_tokenizers(tmp_path_factory):
    """(ours, transformers') for a tokenizer on which the original's label arithmetic holds: legacy (text
    after </s> starts a word, as the original's rounds assume) with BOS, trained on the templates' text so
    that role names are single pieces in and out of context. (On other tokenizers the original itself
    warns "tokenization mismatch" and masks the whole example.)"""
    from llava_jax.data import tiny_tokenizer
    from llava_jax.data.tokenizer import load_tokenizer
    from tests.test_conversation import original_prompt

    lines = tiny_tokenizer.corpus(num_lines=400, seed=0)
    for name in ORIGINAL_TEMPLATES:
        for record in (MULTI_TURN, TEXT_ONLY, DIGIT_REPLY):
            turns = record["conversations"][1:] if record is DIGIT_REPLY else record["conversations"]
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
            prompt = original_prompt(name, messages, False)
            lines += [prompt] * 20 + [p for p in prompt.split(conv_templates[name].sep2) if p] * 20
    proto = tiny_tokenizer.train_sentencepiece(lines, vocab_size=1000, user_defined_symbols=("<|im_start|>", "<|im_end|>"))
    directory = str(tmp_path_factory.mktemp("legacy-tokenizer"))
    tiny_tokenizer.write_llava_hf_tokenizer(directory, proto, added_tokens=("<image>", "<pad>"), legacy=True)
    return load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


def _original_example(name, record, reference_tokenizer, image_token_id):
    """The original train.py: preprocess_multimodal then preprocess (-> preprocess_v1 / _llama_2 / _plain)
    with default_conversation = the template; its one -200 per image expanded to NUM_IMAGE_TOKENS."""
    import copy
    import types

    from tests.original_source import conversation_lib, train_functions

    original = train_functions()
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conv_templates[name]
    try:
        sources = [copy.deepcopy(record["conversations"])]
        has_image = "image" in record
        if has_image:
            data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
            sources = original.preprocess_multimodal(sources, data_args)
        out = original.preprocess(sources, reference_tokenizer, has_image=has_image)
    finally:
        conversation_lib.default_conversation = saved
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert any(label != IGNORE_INDEX for label in labels), "the original masked everything (tokenization mismatch)"
    expand = NUM_IMAGE_TOKENS
    return ([t for i in ids for t in ([image_token_id] * expand if i == -200 else [i])],
            [t for i, label in zip(ids, labels) for t in ([IGNORE_INDEX] * expand if i == -200 else [label])])  # fmt: skip


ORIGINAL_CASES = [(name, record) for name in ORIGINAL_TEMPLATES for record in (MULTI_TURN, TEXT_ONLY, DIGIT_REPLY)]


@pytest.mark.parametrize("name,record", ORIGINAL_CASES + [("plain", CAPTION)],
                         ids=[f"{n}-{r['id']}" for n, r in ORIGINAL_CASES] + ["plain-caption"])  # fmt: skip
def test_input_ids_and_labels_are_the_original_preprocess(original_tokenizers, name, record):
    """chatml_direct (preprocess_mpt) is not compared: its arithmetic fits Yi's tokenizer (no BOS, its own
    merges) and on every tiny tokenizer tried the original masks the whole example."""
    tokenizer, reference = original_tokenizers
    image_id = tokenizer.token_to_id("<image>")
    sizes = [(480, 640)] if "image" in record else []
    example = _builder(tokenizer, name)(record, sizes)
    ids, labels = _original_example(name, record, reference, image_id)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
