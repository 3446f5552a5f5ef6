"""Fuzzing LLaVA data: records through ExampleBuilder, and data files through load_records.

A record ends in BadRecord (a DataError) or an example that holds what training needs (ids and labels
of one length, labels equal to ids or ignored, some supervised, the image tokens where the images are)
and, for the templates the original preprocess_* handles on this tokenizer, equal to the original's.
A data file ends in DataError naming it, or its records.
"""

import json
import os
import tempfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llava_jax.data.examples import IGNORE_INDEX, ExampleBuilder, FixedImageTokens
from llava_jax.data.records import RecordStore, load_records
from llava_jax.errors import DataError
from tests.fuzzing import EXAMPLES, FUZZ, Tally
from tests.test_examples import NUM_IMAGE_TOKENS, ORIGINAL_TEMPLATES, _original_example, original_tokenizers  # noqa: F401

WORDS = ["the", "red", "circle", "2", "13", "?", ".", ",", "\n", " ", "  ", "Yes", "no", "é", "日本"]
ODD = ["<image>", "ASSISTANT:", "</s>", "[INST]", "###", "<|im_end|>"]  # separators inside a turn: rarely
TEXT = st.lists(st.sampled_from(WORDS),
                min_size=1, max_size=8).map(" ".join)
ODD_TEXT = st.lists(st.sampled_from(WORDS + ODD), min_size=0, max_size=5).map("".join)
ROLE = st.sampled_from(["human", "gpt"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)  # fmt: skip


@st.composite
def records(draw):
    """Mostly well-formed conversations (alternating human/gpt), some with any field broken."""
    n = draw(st.integers(2, 6) | st.integers(0, 6))
    start = draw(st.sampled_from([0, 0, 0, 1]))  # sometimes a leading gpt turn
    odd = draw(st.integers(0, 9)) == 0
    turns = [{"from": ("human", "gpt")[(i + start) % 2], "value": draw(ODD_TEXT if odd else TEXT)} for i in range(n)]
    record = {"id": draw(st.integers(0, 99) | st.text(max_size=3)), "conversations": turns}
    if draw(st.booleans()):
        image = draw(st.sampled_from(["a.jpg", ["a.jpg", "b.jpg"], [], "", None]))
        record["image"] = image
        count = 1 if image == "a.jpg" else len(image) if isinstance(image, list) else 0
        first_human = next((t for t in turns if t["from"] == "human"), None)
        if count and first_human is not None:  # where LLaVA data puts the tags: in the first question
            tags = "<image>\n" * count
            first_human["value"] = tags + first_human["value"] if draw(st.booleans()) else first_human["value"] + "\n" + tags
    if draw(st.integers(0, 5)) == 0:  # break something
        kind = draw(st.sampled_from(["role", "value", "turn", "conversations", "image", "record"]))
        if kind == "role" and turns:
            turns[draw(st.integers(0, len(turns) - 1))]["from"] = draw(st.sampled_from(["system", "Human", "", "bot"]))
        elif kind == "value" and turns:
            turns[draw(st.integers(0, len(turns) - 1))]["value"] = draw(JSON)
        elif kind == "turn" and turns:
            turns[draw(st.integers(0, len(turns) - 1))] = draw(JSON)
        elif kind == "conversations":
            record["conversations"] = draw(JSON)
        elif kind == "image":
            record["image"] = draw(JSON)
        else:
            return draw(JSON)
    return record


def check_example(example, record, image_id, num_images):
    ids, labels = example["input_ids"], example["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape and ids.ndim == 1
    supervised = labels != IGNORE_INDEX
    assert supervised.any()
    np.testing.assert_array_equal(labels[supervised], ids[supervised])
    assert (ids == image_id).sum() == NUM_IMAGE_TOKENS * num_images
    assert not (supervised & (ids == image_id)).any()


def test_records_become_examples_or_bad_records(original_tokenizers):
    tokenizer, reference = original_tokenizers
    image_id = tokenizer.token_to_id("<image>")
    tally, compared = Tally("LLaVA records -> examples"), []

    @FUZZ
    @given(record=records(), template=st.sampled_from(ORIGINAL_TEMPLATES + ["chatml_direct", "plain"]),
           max_length=st.none() | st.integers(1, 60))  # fmt: skip
    def case(record, template, max_length):
        builder = ExampleBuilder(tokenizer=tokenizer, template=template, image_token_id=image_id,
                                 num_image_tokens=FixedImageTokens(NUM_IMAGE_TOKENS), max_length=max_length)  # fmt: skip
        image = record.get("image") if isinstance(record, dict) else None
        num_images = 1 if isinstance(image, str) and image else len(image) if isinstance(image, list) else 0
        result = tally.run(lambda: builder(record, [(30, 40)] * num_images))
        if isinstance(result, DataError):
            assert repr(record["id"]) in str(result) if isinstance(record, dict) and "id" in record else True
            return
        check_example(result, record, image_id, num_images)
        if max_length is not None:
            assert len(result["input_ids"]) <= max_length
        elif template in ORIGINAL_TEMPLATES and num_images <= 1:  # the original collapses several <image> into one
            try:
                ids, labels = _original_example(template, record, reference, image_id)
            except AssertionError:  # the original masked everything ("tokenization mismatch"): nothing to compare
                return
            except KeyError:  # roles other than exactly "human"/"gpt", which examples.py accepts in any case
                assert any(t["from"] not in ("human", "gpt") for t in record["conversations"])
                return
            assert result["input_ids"].tolist() == ids
            assert result["labels"].tolist() == labels
            compared.append(1)

    case()
    tally.report(minimum=EXAMPLES // 2)
    print(f"compared with the original preprocess: {len(compared)}")
    assert len(compared) >= EXAMPLES // 20


def test_data_files_load_or_raise_data_error():
    tally = Tally("LLaVA data files")

    @FUZZ
    @given(content=JSON.map(json.dumps).map(str.encode) | st.binary(max_size=40), jsonl=st.booleans(),
           cut=st.integers(0, 5))  # fmt: skip
    def case(content, jsonl, cut):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "data.jsonl" if jsonl else "data.json")
            with open(path, "wb") as f:
                f.write(content[: len(content) - cut] if cut < len(content) else content)
            result = tally.run(lambda: load_records([path]))
            if isinstance(result, DataError):
                assert path in str(result)
            else:
                assert isinstance(result, list)
                store = RecordStore(result)
                assert [store[i] for i in range(len(store))] == result

    case()
    tally.report(minimum=EXAMPLES // 2)
