"""Tiny LLaMA-style tokenizers trained on the spot, written as llava-hf checkpoint directories.

For tests, benchmarks and the from-scratch demo, where nothing can be downloaded: a sentencepiece BPE
model with LLaMA's settings (byte fallback, split digits, dummy prefix, no whitespace folding) and the
files a llava-hf release ships next to it (`tokenizer_config.json` with `added_tokens_decoder`,
`special_tokens_map.json`, `added_tokens.json`).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Sequence

import sentencepiece

WORDS = (
    "the a an of in on to is are what how many which where there this that it color shape image picture "
    "red green blue yellow purple circle square triangle star left right top bottom cat dog person car "
    "USER ASSISTANT Human Assistant user assistant system answer question helpful language vision you "
    "describe briefly photo shows"
).split()


def corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with digits and punctuation, enough for a few hundred pieces."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words)
        if i % 3 == 0:
            line = line.capitalize() + rng.choice(("?", ".", "!", ":", ","))
        if i % 7 == 0:
            line += f" {rng.randint(0, 9999)} items."
        if i % 11 == 0:
            line = line.replace(" ", "  ", 1)
        lines.append(line)
    return lines


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 512, user_defined_symbols: Sequence[str] = ()) -> bytes:
    """A serialized sentencepiece BPE model with LLaMA's normalizer and trainer settings."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_llava_hf_tokenizer(
    directory: str,
    model_proto: bytes,
    *,
    added_tokens: Sequence[str] = ("<image>", "<pad>"),
    pad_token: str | None = "<pad>",
    legacy: bool | None = False,
    add_bos_token: bool = True,
    add_eos_token: bool = False,
) -> dict[str, int]:
    """Writes tokenizer.model and a llava-hf release's config files; returns the added tokens' ids.

    Tokens of `added_tokens` that are already pieces of the model keep their piece id; new ones get
    ids after the vocabulary, in order (as `<image>` = 32000 and `<pad>` = 32001 in llava-1.5-7b-hf).
    `legacy=None` leaves the key out of the config.
    """
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model_proto)
    ids: dict[str, int] = {}
    next_id = processor.get_piece_size()
    for token in added_tokens:
        piece_id = processor.piece_to_id(token)
        if piece_id != processor.unk_id() or token == processor.id_to_piece(processor.unk_id()):
            ids[token] = piece_id
        else:
            ids[token], next_id = next_id, next_id + 1
    decoder = {str(i): _entry(processor.id_to_piece(i)) for i in (0, 1, 2)}
    decoder.update({str(i): _entry(token) for token, i in ids.items()})
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": add_eos_token,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 4096,
        "pad_token": pad_token,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    if legacy is not None:
        config["legacy"] = legacy
    special_map = {"bos_token": _entry("<s>"), "eos_token": _entry("</s>"), "unk_token": _entry("<unk>")}
    if pad_token is not None:
        special_map["pad_token"] = pad_token
    for entry in special_map.values():
        if isinstance(entry, dict):
            del entry["special"]
    _write_json(directory, "tokenizer_config.json", config)
    _write_json(directory, "special_tokens_map.json", special_map)
    _write_json(directory, "added_tokens.json", {t: i for t, i in ids.items() if i >= processor.get_piece_size()})
    return ids


def _write_json(directory: str, name: str, obj) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
