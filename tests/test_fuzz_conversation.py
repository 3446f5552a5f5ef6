"""Fuzzing conversation templates against the original LLaVA's `conv_templates[name].get_prompt()`.

Random conversations (system prompts, alternating or not, contents with separators, role names,
`<image>`, newlines, empty strings, non-strings) through every template: each ends in the project's
InputError, or in exactly the original's prompt text.
"""

from hypothesis import given
from hypothesis import strategies as st

from llava_jax.data.conversation import ALIASES, TEMPLATES, render
from llava_jax.errors import InputError
from tests.fuzzing import EXAMPLES, FUZZ, Tally
from tests.test_conversation import original_prompt

NAMES = sorted(set(TEMPLATES) | set(ALIASES))
PIECES = ["<image>", "\n", " ", "###", "</s>", "<s>", "[INST]", "<|im_end|>", "USER:", "ASSISTANT", ":", "a", "Ü"]
TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=6).map("".join)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    n = draw(st.integers(0, 5))
    shuffled = draw(st.booleans()) and draw(st.integers(0, 9)) == 0  # mostly valid role orders
    for i in range(n):
        role = draw(st.sampled_from(["user", "assistant", "system", "tool"])) if shuffled else ("user", "assistant")[i % 2]
        content = draw(TEXT | st.sampled_from([None, 3])) if draw(st.integers(0, 19)) == 0 else draw(TEXT)
        messages.append({"role": role, "content": content})
    return messages


def test_templates_render_as_the_original():
    tally = Tally("conversation templates vs the original")

    @FUZZ
    @given(name=st.sampled_from(NAMES), messages=conversations(), add_generation_prompt=st.booleans())
    def case(name, messages, add_generation_prompt):
        result = tally.run(lambda: render(name, messages, add_generation_prompt))
        if isinstance(result, InputError):
            return
        expected = original_prompt(name, messages, add_generation_prompt)
        assert result == expected, (name, messages, add_generation_prompt)

    case()
    tally.report(minimum=EXAMPLES // 2)
    assert tally.outcomes["ok"] >= EXAMPLES // 4  # most cases render, so the comparison is exercised

