"""LLaVA's conversation templates, rendered exactly as the original `conv_templates[name].get_prompt()`.

`render(name, messages)` takes `{"role": "system"|"user"|"assistant", "content": str}` messages: an
optional leading system message replaces the template's default system prompt, then user and
assistant alternate, starting with the user. `render_spans` gives the same text cut into pieces that
say which characters are an assistant reply plus its end-of-turn marker: the text LLaVA's training
supervises (`examples.py`).

Styles (the original's SeparatorStyle) and what one user/assistant round renders to:
  single   (llava_v0)           "{system}###Human: {q}###Assistant: {a}###"
  two      (vicuna_v1, llava_v1) "{system} USER: {q} ASSISTANT: {a}</s>"
  llama_2  (llava_llama_2, mistral_instruct, llama_2)
                                 "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s>" (<s> between rounds)
  mpt      (chatml_direct, mpt) "<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|>..."
  plain    (plain)               "{q}\\n"; an assistant turn fails in the original (its sep2 is None)
An empty message renders as the original renders a missing one (the role alone, or nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llava_jax.errors import InputError, UnknownNameError

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_MPT_SYSTEM = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """One conversation format. `system` is the default system prompt; `system_format` wraps any
    system prompt (ChatML puts a header before it)."""

    style: str  # "single", "two", "llama_2", "mpt", "plain"
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None = None
    system_format: str = "{}"

    @property
    def stop_string(self) -> str:
        """The text that ends an assistant turn (what the original CLI stops generation on)."""
        return self.sep2 if self.style in ("two", "llama_2") else self.sep


TEMPLATES: dict[str, Template] = {
    "llava_v0": Template("single", _LLAVA_SYSTEM, ("Human", "Assistant"), "###"),
    "vicuna_v1": Template("two", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v1": Template("two", _LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llama_2": Template("llama_2", _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
    "llava_llama_2": Template("llama_2", _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>"),
    "mistral_instruct": Template("llama_2", "", ("USER", "ASSISTANT"), "", "</s>"),
    "chatml_direct": Template(
        "mpt", "Answer the questions.", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>",
        system_format="<|im_start|>system\n{}",
    ),
    "mpt": Template(
        "mpt", _MPT_SYSTEM, ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>",
        system_format="<|im_start|>system\n{}",
    ),
    "plain": Template("plain", "", ("", ""), "\n"),
}  # fmt: skip
ALIASES = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct", "v0_plain": "plain"}


def get_template(name: str) -> Template:
    name = ALIASES.get(name, name)
    if name not in TEMPLATES:
        raise UnknownNameError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES) + sorted(ALIASES)}")
    return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of rendered text; `is_reply` marks an assistant reply with its end-of-turn marker."""

    text: str
    is_reply: bool = False


def render(name: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text, equal to the original's `get_prompt()` for the same messages.

    With `add_generation_prompt`, the assistant's empty turn follows (as the CLI appends `None`).
    """
    return "".join(span.text for span in render_spans(name, messages, add_generation_prompt))


def render_spans(name: str, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Span]:
    """`render`'s text as spans, the assistant replies (plus end-of-turn) marked."""
    template = get_template(name)
    system, turns = _split_system(messages)
    system = template.system_format.format(template.system if system is None else system)
    if add_generation_prompt:
        if turns and turns[-1][0] == 1:
            raise InputError("add_generation_prompt=True after an assistant message; the next turn is the user's")
        turns.append((1, None))
    return _RENDERERS[template.style](template, system, turns)


def _split_system(messages: Sequence[dict]) -> tuple[str | None, list[tuple[int, str | None]]]:
    """(system prompt or None, [(0 for user / 1 for assistant, content)]), checking the roles alternate."""
    messages = list(messages)
    system = None
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = messages.pop(0).get("content")
        if not isinstance(system, str):
            raise InputError(f"the system message's content must be a string, got {type(system).__name__}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"message {i} is a {type(message).__name__}; messages are {{'role': ..., 'content': str}}")
        role = message.get("role")
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise InputError(
                f"message {i} has role {role!r}, expected {expected!r}: after an optional leading system "
                "message, user and assistant messages alternate, starting with the user"
            )
        if not isinstance(message.get("content"), str):
            raise InputError(f"message {i} content must be a string, got {type(message.get('content')).__name__}")
        turns.append((i % 2, message["content"]))
    return system, turns


def _render_role_colon(t: Template, system: str, turns) -> list[Span]:
    """single and two: "ROLE: content" + separator (two ends assistant turns with sep2)."""
    spans = [Span(system + t.sep)]
    for who, content in turns:
        if not content:
            spans.append(Span(t.roles[who] + ":"))
        elif who == 0:
            spans.append(Span(f"{t.roles[0]}: {content}{t.sep}"))
        else:
            spans += [Span(f"{t.roles[1]}: "), Span(content + t.stop_string, is_reply=True)]
    return spans


def _render_llama_2(t: Template, system: str, turns) -> list[Span]:
    if not turns or not turns[0][1]:
        raise InputError(f"the {t.style} style needs a non-empty first user message (the original asserts it)")
    spans = []
    for i, (who, content) in enumerate(turns):
        if not content:
            continue
        if who == 0:
            if i == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            spans.append(Span(f"{t.sep}[INST] {content} [/INST]"))
        else:
            spans += [Span(" "), Span(f"{content} {t.sep2}", is_reply=True)]
    # The original strips the leading separator with str.lstrip, i.e. its characters as a set.
    spans[0] = Span(spans[0].text.lstrip(t.sep))
    return spans


def _render_mpt(t: Template, system: str, turns) -> list[Span]:
    spans = [Span(system + t.sep)]
    for who, content in turns:
        if not content:
            spans.append(Span(t.roles[who]))
        elif who == 0:
            spans.append(Span(t.roles[0] + content + t.sep))
        else:
            spans += [Span(t.roles[1]), Span(content + t.sep, is_reply=True)]
    return spans


def _render_plain(t: Template, system: str, turns) -> list[Span]:
    spans = [Span(system)]
    for who, content in turns:
        if content and who == 1:
            raise InputError(
                "the plain template renders no assistant turn (the original's sep2 is None); "
                "pretraining examples are built as '<image>' + caption + '\\n' by examples.py"
            )
        if content:
            spans.append(Span(content + t.sep))
    return spans


_RENDERERS = {
    "single": _render_role_colon,
    "two": _render_role_colon,
    "llama_2": _render_llama_2,
    "mpt": _render_mpt,
    "plain": _render_plain,
}


def get_model_name_from_path(model_path: str) -> str:
    """The original's model name: the last path component, or 'parent_checkpoint-N' for a checkpoint."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-"):
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def template_for(model_name_or_path: str, config: dict | None = None) -> str:
    """The template the original CLI (llava/serve/cli.py, eval/run_llava.py) picks from the model name.

    Where the name has none of the original's hints (it would pick llava_v0, e.g. llava-hf's
    "llava-1.5-7b-hf"), a `config` (the checkpoint's config.json as a dict) decides: a Mistral text
    model -> mistral_instruct, Yi-34B's 64000-token vocabulary -> chatml_direct, otherwise llava_v1.
    """
    name = get_model_name_from_path(model_name_or_path).lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    if config is None:
        return "llava_v0"
    text = config.get("text_config") or config
    model_type = str(text.get("model_type", config.get("model_type", "")))
    if "mistral" in model_type:
        return "mistral_instruct"
    if text.get("vocab_size") in (64000, 64064):
        return "chatml_direct"
    return "llava_v1"
