"""render() equals the original LLaVA `conv_templates[name].get_prompt()`; template_for picks as the CLI does."""

import pytest
from llava.conversation import conv_templates

from llava_jax.data.conversation import ALIASES, TEMPLATES, render, render_spans, template_for

CHAT_TEMPLATES = sorted(set(TEMPLATES) - {"plain"})

CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is in the picture?"}],
    [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "The circle is red."},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": "Blue, next to\nthe 3 triangles."},
        {"role": "user", "content": "How many shapes are there?"},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Is it a cat?"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "<image>\nAnd this one: a dog?  "},
    ],
    [{"role": "user", "content": "Describe the image.\n<image>"}, {"role": "assistant", "content": "A red star."}],
]


def original_prompt(name, messages, add_generation_prompt):
    """The original LLaVA code path: copy the template, append messages, get_prompt()."""
    conv = conv_templates[name].copy()
    conv.messages = []
    for message in messages:
        if message["role"] == "system":
            chatml = conv.sep_style.name == "MPT"  # its system prompt carries the ChatML header
            conv.system = ("<|im_start|>system\n" if chatml else "") + message["content"]
        else:
            conv.append_message(conv.roles[message["role"] == "assistant"], message["content"])
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("name", CHAT_TEMPLATES + sorted(ALIASES))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_render_equals_original(name, index):
    messages = CONVERSATIONS[index]
    ends_with_user = messages[-1]["role"] == "user"
    for add_generation_prompt in (True, False) if ends_with_user else (False,):
        if name in ("plain", "v0_plain"):
            continue
        expected = original_prompt(name, messages, add_generation_prompt)
        assert render(name, messages, add_generation_prompt) == expected


@pytest.mark.parametrize("name", ["plain", "v0_plain"])
def test_plain_renders_user_turns_and_refuses_assistant_turns_like_the_original(name):
    for content in ("<image>\nWhat is this?", "<image>", "Describe <image> briefly."):
        messages = [{"role": "user", "content": content}]
        for add_generation_prompt in (True, False):
            assert render(name, messages, add_generation_prompt) == original_prompt(
                name, messages, add_generation_prompt
            )
    captioned = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red circle."}]
    with pytest.raises(TypeError):  # the original's sep2 is None
        original_prompt(name, captioned, False)
    with pytest.raises(ValueError, match="plain template renders no assistant turn"):
        render(name, captioned, add_generation_prompt=False)


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_reply_spans_are_the_replies_with_their_end_marker(name):
    messages = CONVERSATIONS[1][:4]
    spans = render_spans(name, messages)
    assert "".join(s.text for s in spans) == original_prompt(name, messages, False)
    conv = conv_templates[name]
    # The end-of-turn text of each style, from the original template's own fields.
    end = {"TWO": conv.sep2, "LLAMA_2": " " + str(conv.sep2), "MPT": conv.sep, "SINGLE": conv.sep}[conv.sep_style.name]
    replies = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert [s.text for s in spans if s.is_reply] == replies


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="expected 'user'"):
        render("vicuna_v1", [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="expected 'assistant'"):
        render("vicuna_v1", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="after an assistant message"):
        render("vicuna_v1", CONVERSATIONS[3], add_generation_prompt=True)
    with pytest.raises(KeyError, match="unknown conversation template 'nope'"):
        render("nope", CONVERSATIONS[0])


@pytest.mark.parametrize(
    "path, expected",
    [
        ("liuhaotian/llava-v1.5-7b", "llava_v1"),
        ("liuhaotian/llava-v1.5-13b/", "llava_v1"),
        ("liuhaotian/llava-v1.6-vicuna-7b", "llava_v1"),
        ("liuhaotian/llava-v1.6-mistral-7b", "mistral_instruct"),
        ("liuhaotian/llava-v1.6-34b", "chatml_direct"),
        ("liuhaotian/llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("liuhaotian/LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("liuhaotian/LLaVA-13b-delta-v0", "llava_v0"),
        ("checkpoints/llava-v1.5-7b-finetune/checkpoint-500", "llava_v1"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral_instruct"),
        ("llava-hf/llava-1.5-7b-hf", "llava_v0"),  # no hint in the name: the CLI's fallback
    ],
)
def test_template_for_follows_the_cli(path, expected):
    assert template_for(path) == expected


def test_template_for_uses_the_config_where_the_name_has_no_hint():
    llama = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064}}
    mistral = {"model_type": "llava_next", "text_config": {"model_type": "mistral", "vocab_size": 32064}}
    yi = {"model_type": "llava_next", "text_config": {"model_type": "llama", "vocab_size": 64064}}
    assert template_for("llava-hf/llava-1.5-7b-hf", llama) == "llava_v1"
    assert template_for("my/llava-next-finetune", mistral) == "mistral_instruct"
    assert template_for("my/llava-next-finetune", yi) == "chatml_direct"
    assert template_for("liuhaotian/llava-v1.6-34b", llama) == "chatml_direct"  # the name wins
