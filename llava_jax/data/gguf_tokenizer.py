"""The tokenizer a GGUF language model carries in its metadata, as a `Tokenizer` (data/tokenizer.py).

llama.cpp's converter stores a SentencePiece vocabulary (`tokenizer.ggml.model` "llama") as three
parallel lists: `tokenizer.ggml.tokens` (piece strings), `.scores` and `.token_type` (sentencepiece's
piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte). Added tokens such as
llava-hf's `<image>` are control or user-defined pieces at their ids, and the table is padded to the
embedding size with unused `[PAD{i}]` pieces. Those lists are the pieces of a sentencepiece
ModelProto; it is written with a tokenizer_config.json built from the `tokenizer.ggml.*` special-token
keys and read by `load_tokenizer`, so ids are those the source checkpoint's tokenizer (as transformers
builds it) gives. llama.cpp's own tokenizer differs in one place: it puts the "▁" prefix on the text
after every special token (transformers' `legacy: true`); here the prefix goes on the first text
segment only, as the llava-hf and original LLaVA tokenizers (`legacy: false`) do.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from llava_jax.data.tokenizer import Tokenizer, load_tokenizer
from llava_jax.errors import UnsupportedError

_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}  # fmt: skip


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], *, add_space_prefix: bool) -> bytes:
    """A serialized sentencepiece BPE ModelProto with these pieces."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"tokenizer.ggml tokens/scores/token_type lengths differ: {len(tokens)}, {len(scores)}, "
                         f"{len(types)}")  # fmt: skip
    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(t == sp.ModelProto.SentencePiece.BYTE for t in types)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    return proto.SerializeToString()


def tokenizer_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer_config.json dict from the `tokenizer.ggml.*` keys (llama.cpp's defaults where absent)."""
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(metadata.get("tokenizer.ggml.add_space_prefix", True)),
    }
    for name, key in _SPECIAL_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    return config


def write_tokenizer_files(metadata: dict[str, Any], directory: str, source: str = "GGUF file") -> None:
    """Writes tokenizer.model and tokenizer_config.json for a GGUF language model's metadata (keys -> Python
    values) into `directory`; `load_tokenizer(directory)` then reads them."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise UnsupportedError(
            f"{source}: tokenizer.ggml.model {model!r} is not supported; only 'llama' (SentencePiece, the LLaMA, "
            "Vicuna and Mistral tokenizers LLaVA uses) is"
        )
    for key in ("tokens", "scores", "token_type"):
        if f"tokenizer.ggml.{key}" not in metadata:
            raise ValueError(f"{source} lacks tokenizer.ggml.{key}")
    config = tokenizer_config(metadata)
    proto = sentencepiece_proto(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"],
                                metadata["tokenizer.ggml.token_type"], add_space_prefix=config["add_prefix_space"])  # fmt: skip
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(proto)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def tokenizer_from_gguf(metadata: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
    """The Tokenizer of a GGUF language model's metadata (keys -> Python values)."""
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as directory:
        write_tokenizer_files(metadata, directory, source)
        return load_tokenizer(directory)
