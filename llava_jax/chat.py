"""Chat: conversations rendered with LLaVA's templates, answered by a Pipeline, optionally streamed.

A `ChatSession` keeps the messages and the images; each turn renders the whole conversation and
generates the reply. The images' features stay in the pipeline's feature cache, so later turns do not
run the vision tower again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence

from llava_jax.checkpoints import orbax
from llava_jax.data.conversation import get_template, render, template_for
from llava_jax.data.image import load_image
from llava_jax.data.prepare import IMAGE_TAG, ImageCountError, PromptTooLong
from llava_jax.errors import ConfigError
from llava_jax.generate import cut_at_stop

_log = logging.getLogger(__name__)


def checkpoint_template(path: str | None, config) -> str:
    """The template the original CLI would pick for the checkpoint at `path` (LlavaConfig `config`).

    A llava_jax directory carries the choice made for its source at conversion (its own name is the
    user's). Otherwise the name decides where it has a hint (`template_for`); a GGUF file's name rarely
    has one ("ggml-model-q4_k.gguf"), so its directory's name is tried too. Without a hint, the
    checkpoint's config.json decides, or where there is none, the model's vocabulary size.
    """
    if not path:
        return template_for("model", _config_hint(config))
    path = os.path.abspath(path)
    recorded = _recorded_template(path)
    if recorded is not None:
        return recorded
    names = [path, os.path.dirname(path)] if os.path.isfile(path) else [path]
    for name in names:
        template = template_for(name)
        if template != "llava_v0":
            return template
    config_json = os.path.join(path, "config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            return template_for(path, json.load(f))
    return template_for(path, _config_hint(config))


def _recorded_template(path: str) -> str | None:
    from llava_jax.train import run_dir

    if run_dir.is_run_dir(path):
        return run_dir.latest_stage(path).template
    if not (os.path.isdir(path) and orbax.is_model_dir(path)):
        return None
    with open(os.path.join(path, orbax.MARKER)) as f:
        return json.load(f).get("template")


def _config_hint(config) -> dict | None:
    """What `template_for` reads from a config.json, from a LlavaConfig (the vocabulary size)."""
    return None if config is None else {"text_config": {"model_type": "llama", "vocab_size": config.text.vocab_size}}


def default_template(pipe) -> str:
    """The template the original CLI would pick for this pipeline's checkpoint (`checkpoint_template`)."""
    return checkpoint_template(pipe.directory, pipe.config)


class ChatSession:
    """A multi-turn conversation about some images (paths, bytes or PIL images, loaded up front).

    The first user message gets one `<image>` per image in front of it ("<image>\\n" + text, as the
    original CLI does) unless it places the tags itself.
    """

    def __init__(self, pipe, images: Sequence = (), template: str | None = None, system: str | None = None):
        if pipe.tokenizer is None:
            raise ConfigError("chat needs the checkpoint's tokenizer; this pipeline has none (its directory has no "
                              "tokenizer.model or tokenizer.json)")
        self.pipe = pipe
        images = images if isinstance(images, (list, tuple)) else [images]
        self.images = [load_image(im) if isinstance(im, (str, os.PathLike, bytes, bytearray)) else im for im in images]
        self.template = template or default_template(pipe)
        get_template(self.template)  # fails early on an unknown name
        self.messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        self.dropped_turns = 0  # turns the last question dropped to fit the context

    @property
    def stop(self) -> tuple[str, ...]:
        eos = self.pipe.tokenizer.decode([self.pipe.tokenizer.eos_id]) if self.pipe.tokenizer.eos_id is not None else ""
        return tuple(s for s in {get_template(self.template).stop_string, eos} if s)

    def _user_text(self, prompt: str) -> str:
        if any(m["role"] == "user" for m in self.messages):
            if IMAGE_TAG in prompt:
                raise ImageCountError(f"{IMAGE_TAG} goes in the first message only; this conversation's images "
                                      "were placed there")  # fmt: skip
            return prompt
        tags = prompt.count(IMAGE_TAG)
        if tags == 0:
            return (IMAGE_TAG + "\n") * len(self.images) + prompt
        if tags != len(self.images):
            raise ImageCountError(f"the prompt has {tags} {IMAGE_TAG} tags but the conversation has "
                                  f"{len(self.images)} images; give one image per tag")  # fmt: skip
        return prompt

    def _fit(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], dict]:
        """(messages, prepared inputs) with the oldest turns dropped while the prompt plus room for the
        reply outgrows the context. The images' tags move to the first user message left."""
        config = self.pipe.config
        reserve = min(max_new_tokens, config.context_length // 4)  # room for the reply, at least a little
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            text = render(self.template, messages, add_generation_prompt=True)
            try:
                inputs = self.pipe.prepare(text, self.images)
                too_long = inputs["input_ids"].shape[1] + reserve > config.context_length
            except PromptTooLong:
                inputs, too_long = None, True
            if not too_long or len(messages) - first < 3:  # fits, or only the new message is left
                break
            messages = messages[:first] + self._retag(messages[first + 2 :])
            dropped += 1
        if inputs is None:  # the new message alone is too long: prepare says by how much
            self.pipe.prepare(render(self.template, messages, add_generation_prompt=True), self.images)
        self.dropped_turns = dropped
        if dropped:
            _log.warning("dropped the oldest %d turn(s) of the conversation: it outgrew the context of %d tokens",
                            dropped, config.context_length)  # fmt: skip
        return messages, inputs

    def _retag(self, messages: list[dict]) -> list[dict]:
        """The first user message of what is left gets the images' tags (they were in a dropped one)."""
        if not self.images or IMAGE_TAG in messages[0]["content"]:
            return messages
        head = dict(messages[0], content=(IMAGE_TAG + "\n") * len(self.images) + messages[0]["content"])
        return [head] + messages[1:]

    def ask_stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Adds the user's message and yields the reply's text as it is generated; the finished reply
        (cut at the template's stop string, stripped) joins the conversation.

        When the conversation no longer fits the model's context (with room for the reply), its oldest
        turns are dropped (`dropped_turns` says how many; a warning is logged)."""
        messages = self.messages + [{"role": "user", "content": self._user_text(prompt)}]
        messages, inputs = self._fit(messages, sampling.get("max_new_tokens", 256))
        tokenizer, stop = self.pipe.tokenizer, self.stop
        ids: list[int] = []
        shown = ""
        for new in self.pipe.generate_stream(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                             stop=stop, **sampling):  # fmt: skip
            ids += new[0]
            stable = stable_text(tokenizer.decode(ids[: settled(ids, tokenizer)]), stop).lstrip()
            if len(stable) > len(shown):
                yield stable[len(shown):]
                shown = stable
        reply = cut_at_stop(tokenizer.decode(ids), stop).strip()
        if reply.startswith(shown) and len(reply) > len(shown):
            yield reply[len(shown):]
        self.messages = messages + [{"role": "assistant", "content": reply}]

    def ask(self, prompt: str, **sampling) -> str:
        """The reply to `prompt` (see ask_stream)."""
        for _ in self.ask_stream(prompt, **sampling):
            pass
        return self.messages[-1]["content"]


def settled(ids: Sequence[int], tokenizer) -> int:
    """How many leading ids decode to text that later ids cannot change: all but a trailing run of
    one-character tokens. Byte-fallback tokens decode as a group, so a byte that reads as a valid
    character now may read as U+FFFD once the bytes after it arrive."""
    n = len(ids)
    while n and len(tokenizer.decode(ids[n - 1 : n])) <= 1:
        n -= 1
    return n


def stable_text(text: str, stop: Sequence[str]) -> str:
    """The part of a growing reply that later tokens cannot change: cut at a stop string, without a
    tail that may be the start of one."""
    text = cut_at_stop(text, stop)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                return text[:-k]
    return text
