"""Context limits: prepare, logits, generate and chat refuse or fit what outgrows the model's context
(max_position_embeddings, or the original's model_max_length for prompts); a chat drops its oldest turns."""

import logging

import numpy as np
import pytest

from llava_jax.chat import ChatSession
from llava_jax.data.conversation import render
from llava_jax.data.prepare import PromptTooLong
from llava_jax.errors import InputError
from tests import reference as R
from tests.test_chat import chat_model, hf_reply, picture  # noqa: F401  (the fixture)

LONG = "Please describe every shape, its colour, its size and where it sits relative to the others. " * 2


def test_limits_in_prepare_logits_and_generate(chat_model):
    _, _, pipe = chat_model
    context = pipe.config.text.max_position_embeddings
    assert pipe.config.model_max_length is None and pipe.config.prompt_limit == context == R.TEXT["max_position_embeddings"]
    with pytest.raises(PromptTooLong, match=rf"longer than the {context} of the model's context \(max_position_embeddings\)"):
        pipe.prepare("USER: <image>\n" + LONG * 20 + " ASSISTANT:", [picture(0)])
    assert issubclass(PromptTooLong, InputError)
    ids = np.ones((1, context + 1), np.int64)
    with pytest.raises(PromptTooLong, match=f"{context + 1} positions, more than the model's context of {context}"):
        pipe.logits(ids)
    with pytest.raises(PromptTooLong, match=f"does not fit the model's context of {context}"):
        pipe.generate(ids[:, :context], max_new_tokens=2)
    assert pipe.logits(ids[:, :context]).shape == (1, context, pipe.config.text.vocab_size)
    # a prompt one short of the context still gets its one new token
    assert len(pipe.generate(ids[:, : context - 1], max_new_tokens=5)[0]) == 1


def test_prepare_uses_model_max_length_where_the_checkpoint_has_one(chat_model):
    _, _, pipe = chat_model
    original = pipe.config
    try:
        pipe.config = original.replace(model_max_length=40)
        assert pipe.config.prompt_limit == 40
        with pytest.raises(PromptTooLong, match="longer than the 40 the model was trained on"):
            pipe.prepare("USER: <image>\n" + LONG + " ASSISTANT:", [picture(0)])
    finally:
        pipe.config = original


def test_chat_drops_its_oldest_turns_and_says_so(chat_model, caplog):
    model, _, pipe = chat_model
    session = ChatSession(pipe, [picture(1)])
    dropped = []
    with caplog.at_level(logging.WARNING):
        for turn in range(8):
            session.ask(f"Question {turn}: {LONG}", max_new_tokens=6, temperature=0)
            dropped.append(session.dropped_turns)
            rendered = render(session.template, session.messages[:-1])
            assert pipe.prepare(rendered, [picture(1)])["input_ids"].shape[1] + 6 <= pipe.config.context_length
    assert dropped[0] == 0 and sum(dropped) > 0  # the first turns fit; later ones dropped what outgrew the context
    assert "dropped the oldest" in caplog.text and "outgrew the context" in caplog.text
    user_turns = [m["content"] for m in session.messages if m["role"] == "user"]
    assert user_turns[0].startswith("<image>\n") and sum(t.count("<image>") for t in user_turns) == 1
    assert "Question 7" in user_turns[-1] and "Question 0" not in "".join(user_turns)
    # the last reply is what transformers generates for the trimmed conversation
    assert session.messages[-1]["content"] == hf_reply(model, pipe, render(session.template, session.messages[:-1]),
                                                       [picture(1)], 6)  # fmt: skip


def test_a_single_message_longer_than_the_context_is_refused(chat_model):
    _, _, pipe = chat_model
    session = ChatSession(pipe, [picture(1)])
    with pytest.raises(PromptTooLong):
        session.ask(LONG * 20, max_new_tokens=4)
    assert session.messages == []  # nothing was added
