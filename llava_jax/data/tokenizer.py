"""Tokenizers of LLaVA checkpoint directories, with the ids transformers gives for the same directory.

`load_tokenizer(directory)` reads what a checkpoint ships and builds a `tokenizers` pipeline the way
transformers 5 (`AutoTokenizer.from_pretrained`) builds it:

- LLaMA-family directories (`tokenizer_class` LlamaTokenizer[Fast], or a bare `tokenizer.model`):
  a byte-fallback BPE over the sentencepiece vocabulary (read from `tokenizer.json` when present,
  else from `tokenizer.model`, merges derived from piece ids), a Metaspace pre-tokenizer whose
  prefix "▁" goes on the first text segment only (`legacy: false`, and transformers 5's default when
  the key is absent) or on every segment after a special token (`legacy: true`), plus the added and
  special tokens that `tokenizer_config.json` (`added_tokens_decoder`), `special_tokens_map.json`,
  `added_tokens.json` and the sentencepiece control pieces declare. A `tokenizer.json` normalizer
  is not used for these (transformers 5 rebuilds the pipeline from the class, too).
- Any other directory with a `tokenizer.json` (no config, `PreTrainedTokenizerFast`,
  `TokenizersBackend`): that file as written.

BOS/EOS: `add_bos_token`/`add_eos_token` from the config when either key is present (a missing one
is false); otherwise the post-processor of `tokenizer.json`; otherwise none.

Where this differs from sentencepiece itself (and from LLaVA's training code, which used the slow
sentencepiece tokenizer): transformers' Metaspace adds the "▁" prefix only when the text does not
already start with a space, so " hello" is ["▁", "he", ...] here and ["▁", "▁", "he", ...] in
sentencepiece. We follow transformers, which is what llava-hf users and evaluations see. LLaVA's
templates never put a space at the start of a segment, so training text tokenizes the same either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from llava_jax.errors import CheckpointError, MissingInputError, UnsupportedError, UserError
from llava_jax.json_file import read_json_object

_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")
_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SP_CONTROL, _SP_USER_DEFINED = 3, 4  # sentencepiece ModelProto.SentencePiece.Type


class Tokenizer:
    """Text <-> ids for one checkpoint. Picklable (the pipeline's worker processes carry it).

    Attributes:
      bos_id, eos_id, pad_id, unk_id: ids of the declared special tokens, None where undeclared.
        `bos_id` of a bare tokenizer.json is the one token its post-processor puts first; `pad_id`
        falls back to `unk_id` when no pad token is declared, as LLaVA's train.py sets it.
      vocab_size: the number of ids including added tokens (transformers' `len(tokenizer)`).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str],
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
    ):
        backend.post_processor = None  # BOS/EOS are added here, so offsets and chunked encodes stay simple
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._prefix_ids = tuple(prefix_ids)
        self._suffix_ids = tuple(suffix_ids)
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)
        ids = {key: self._maybe_id(token) for key, token in special_tokens.items()}
        bos_id = ids.get("bos_token")
        if bos_id is None and len(self._prefix_ids) == 1:
            bos_id = self._prefix_ids[0]  # a bare tokenizer.json declares no bos_token; its post-processor adds it
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = ids.get("eos_token")
        self.unk_id: int | None = ids.get("unk_token")
        pad_id = ids.get("pad_token")
        self.pad_id: int | None = pad_id if pad_id is not None else self.unk_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def adds_bos(self) -> bool:
        """Whether `encode` prepends BOS by default (the checkpoint's choice)."""
        return self.bos_id is not None and self._prefix_ids == (self.bos_id,)

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in this tokenizer's vocabulary or added tokens")
        return token_id

    def _maybe_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _prefix(self, add_bos: bool | None) -> tuple[int, ...]:
        if add_bos is None:
            return self._prefix_ids
        if not add_bos:
            return ()
        if self.bos_id is None:
            raise ValueError(
                "add_bos=True but this tokenizer declares no BOS token (bos_token in tokenizer_config.json)"
            )
        return (self.bos_id,)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`; `add_bos` None adds what the checkpoint adds (BOS for LLaMA), False none, True BOS."""
        body = self._backend.encode(text, add_special_tokens=False).ids
        return [*self._prefix(add_bos), *body, *self._suffix_ids]

    def encode_with_offsets(self, text: str, add_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each id's (start, end) character span in `text`; BOS/EOS get empty spans (0, 0) / (n, n)."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        prefix = self._prefix(add_bos)
        ids = [*prefix, *encoding.ids, *self._suffix_ids]
        offsets = [(0, 0)] * len(prefix) + list(encoding.offsets) + [(len(text), len(text))] * len(self._suffix_ids)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def to_json(self) -> str:
        """This tokenizer as a `tokenizer.json` (BOS/EOS added by its post-processor), which transformers'
        `TokenizersBackend` runs as written: exported checkpoints carry it so that transformers gives these ids."""
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        names = [self._backend.id_to_token(i) for i in (*self._prefix_ids, *self._suffix_ids)]
        prefix, suffix = names[: len(self._prefix_ids)], names[len(self._prefix_ids) :]
        backend.post_processor = processors.TemplateProcessing(
            single=[*prefix, "$A", *suffix], pair=[*prefix, "$A", *suffix, *prefix, "$B:1", *suffix],
            special_tokens=[(n, self._backend.token_to_id(n)) for n in dict.fromkeys(names)],
        )  # fmt: skip
        return backend.to_str()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, prefix={self._prefix_ids}, suffix={self._suffix_ids})"
        )


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory (llava-hf, original LLaVA, or a bare tokenizer.json).

    Damaged tokenizer files raise CheckpointError naming the directory."""
    if not os.path.isdir(directory):
        raise MissingInputError(f"tokenizer directory {directory!r} does not exist")
    try:
        return _load_tokenizer(directory)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OSError, RuntimeError) as e:  # a file's content is wrong
        raise CheckpointError(f"cannot read the tokenizer files in {directory} ({type(e).__name__}: {e}); "
                              "take them from the checkpoint's release again") from e  # fmt: skip


def _load_tokenizer(directory: str) -> Tokenizer:
    files = _TokenizerFiles(directory)
    config = files.config
    tokenizer_class = config.get("tokenizer_class")
    is_llama = tokenizer_class in _LLAMA_CLASSES or (tokenizer_class is None and not files.has_json)
    if is_llama:
        backend, sp_tokens = _llama_backend(files, config)
    elif files.has_json and (tokenizer_class is None or tokenizer_class in _GENERIC_CLASSES):
        try:
            backend, sp_tokens = tokenizers.Tokenizer.from_file(files.path("tokenizer.json")), []
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises plain Exceptions on a bad file)
            raise CheckpointError(f"{files.path('tokenizer.json')} is not a tokenizer file tokenizers can read: {e}") from e
    else:
        raise UnsupportedError(
            f"{directory}: tokenizer_class {tokenizer_class!r} is not supported; supported are "
            f"{_LLAMA_CLASSES + _GENERIC_CLASSES} (LLaVA's LLaMA, Vicuna, Mistral and Yi tokenizers), "
            "or a directory with tokenizer.json and no tokenizer_class"
        )
    special_tokens, declared = _declared_tokens(files, config, is_llama=is_llama)
    _add_tokens(backend, declared + [(None, t) for t in sp_tokens], special_tokens, directory)
    prefix, suffix = _special_affixes(backend, config, special_tokens, files)
    return Tokenizer(
        backend,
        special_tokens={k: v for k, v in special_tokens.items() if v is not None},
        prefix_ids=prefix,
        suffix_ids=suffix,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )


class _TokenizerFiles:
    def __init__(self, directory: str):
        self.directory = directory
        self.has_model = os.path.isfile(self.path("tokenizer.model"))
        self.has_json = os.path.isfile(self.path("tokenizer.json"))
        if not (self.has_model or self.has_json):
            raise MissingInputError(
                f"{directory} has neither tokenizer.model nor tokenizer.json; point at the checkpoint directory "
                "that holds the tokenizer files"
            )
        self._parsed: dict[str, Any] = {}
        self.config = self.read_json("tokenizer_config.json") or {}

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def read_json(self, name: str) -> Any:
        """The parsed file, or None where the directory lacks it (each file is parsed once)."""
        if name not in self._parsed:
            if os.path.isfile(self.path(name)):
                self._parsed[name] = read_json_object(self.path(name), CheckpointError)
            else:
                self._parsed[name] = None
        return self._parsed[name]


def _llama_backend(files: _TokenizerFiles, config: dict) -> tuple[tokenizers.Tokenizer, list[tokenizers.AddedToken]]:
    """Byte-fallback BPE + Metaspace, as transformers 5's LlamaTokenizer builds it."""
    sp_tokens: list[tokenizers.AddedToken] = []
    if files.has_json:
        model = files.read_json("tokenizer.json")["model"]
        if model.get("type") != "BPE":
            raise UnsupportedError(
                f"{files.directory}/tokenizer.json: model type {model.get('type')!r}, expected BPE"
            )
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
        vocab, merges, sp_tokens = _read_sentencepiece_bpe(files.path("tokenizer.model"))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    if not add_prefix_space:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy", False) else "first"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, sp_tokens


def _read_sentencepiece_bpe(path: str) -> tuple[dict[str, int], list[tuple[str, str]], list[tokenizers.AddedToken]]:
    """Vocabulary, BPE merges and control/user-defined pieces of a sentencepiece BPE model."""
    from sentencepiece import sentencepiece_model_pb2

    from google.protobuf.message import DecodeError

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except DecodeError as e:
            raise CheckpointError(f"{path} is not a sentencepiece model ({e}); take it from the release again") from e
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UnsupportedError(f"{path}: only sentencepiece BPE models (LLaMA family) are supported")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    added = [
        tokenizers.AddedToken(piece.piece, normalized=False, special=piece.type == _SP_CONTROL)
        for piece in proto.pieces
        if piece.type in (_SP_CONTROL, _SP_USER_DEFINED)
    ]
    return vocab, bpe_merges(vocab), added


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges that rebuild each piece from two shorter pieces, ranked by the merged piece's id.

    Sentencepiece BPE orders pieces by merge priority, so a piece's id is its merge rank; ties between
    different splits of one piece go to the split whose halves have lower ids (transformers' rule).
    """
    ranked = []
    for piece, piece_id in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((piece_id, len(left), len(right), left, right) for left, right in splits)
    ranked.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in ranked]


def _as_added_token(value: Any, *, special: bool | None = None) -> tokenizers.AddedToken:
    """An AddedToken from a config entry (a string, or a dict as in added_tokens_decoder); `special` forces the flag."""
    if isinstance(value, str):
        special = True if special is None else special
        return tokenizers.AddedToken(value, special=special, normalized=not special)
    fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return tokenizers.AddedToken(
        value["content"], special=value.get("special", False) if special is None else special, **fields
    )


def _content(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else value["content"]


def _declared_tokens(
    files: _TokenizerFiles, config: dict, *, is_llama: bool
) -> tuple[dict[str, str | None], list[tuple[int | None, tokenizers.AddedToken]]]:
    """Special token names (bos/eos/...) and the tokens to add, in transformers' order, with declared ids."""
    special_values: dict[str, Any] = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>") if is_llama else {}
    special_values.update({k: config[k] for k in _SPECIAL_KEYS if k in config})
    added: dict[int, tokenizers.AddedToken] = {}
    if "added_tokens_decoder" in config:
        for index, entry in config["added_tokens_decoder"].items():
            added[int(index)] = _as_added_token(entry)
    else:
        # transformers reads these legacy files only when the config has no added_tokens_decoder.
        special_map = files.read_json("special_tokens_map.json") or {}
        special_values.update({k: v for k, v in special_map.items() if k in _SPECIAL_KEYS})
        names = {_content(v) for v in special_values.values() if v is not None}
        for content, index in (files.read_json("added_tokens.json") or {}).items():
            added[int(index)] = tokenizers.AddedToken(
                content, special=content in names, normalized=content not in names
            )
        if files.has_json:
            for entry in files.read_json("tokenizer.json").get("added_tokens", []):
                added[int(entry["id"])] = _as_added_token(entry)
    special_tokens = {k: _content(special_values.get(k)) for k in _SPECIAL_KEYS}
    named = [
        _as_added_token(special_values[k], special=True) for k in _SPECIAL_KEYS if special_values.get(k) is not None
    ]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extras = [_as_added_token(t, special=True) for t in extra] if isinstance(extra, list) else []
    ordered: list[tuple[int | None, tokenizers.AddedToken]] = [(i, added[i]) for i in sorted(added)]
    return special_tokens, ordered + [(None, t) for t in named + extras]


def _add_tokens(
    backend: tokenizers.Tokenizer,
    declared: list[tuple[int | None, tokenizers.AddedToken]],
    special_tokens: dict[str, str | None],
    directory: str,
) -> None:
    """Adds the tokens not yet in `backend`, in order, and checks each lands on its declared id."""
    present = {str(t) for t in backend.get_added_tokens_decoder().values()}
    names = {v for v in special_tokens.values() if v is not None}
    for index, token in declared:
        if token.content in present:
            continue
        if token.content in names and not token.special:
            token = tokenizers.AddedToken(
                token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                normalized=token.normalized, special=True,
            )  # fmt: skip
        backend.add_tokens([token])
        present.add(token.content)
        got = backend.token_to_id(token.content)
        if index is not None and got != index:
            raise ValueError(
                f"{directory}: added token {token.content!r} is declared with id {index} but lands on id {got}; "
                "the tokenizer files disagree with each other (tokenizer_config.json added_tokens_decoder, "
                "added_tokens.json, tokenizer.json)"
            )


def _special_affixes(
    backend: tokenizers.Tokenizer, config: dict, special_tokens: dict[str, str | None], files: _TokenizerFiles
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before, ids after) the text that `encode` adds by default."""
    if "add_bos_token" in config or "add_eos_token" in config:
        prefix, suffix = (), ()
        if config.get("add_bos_token") and special_tokens.get("bos_token") is not None:
            prefix = (backend.token_to_id(special_tokens["bos_token"]),)
        if config.get("add_eos_token") and special_tokens.get("eos_token") is not None:
            suffix = (backend.token_to_id(special_tokens["eos_token"]),)
        return prefix, suffix
    if not files.has_json:
        return (), ()
    post = files.read_json("tokenizer.json").get("post_processor")
    if post is None:
        return (), ()
    probe = tokenizers.Tokenizer.from_str(backend.to_str())
    probe.post_processor = tokenizers.Tokenizer.from_file(files.path("tokenizer.json")).post_processor
    body = probe.encode("a", add_special_tokens=False).ids
    full = probe.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(body) + 1):
        if full[start : start + len(body)] == body:
            return tuple(full[:start]), tuple(full[start + len(body) :])
    raise ValueError(f"{files.directory}/tokenizer.json: cannot read which special tokens its post_processor adds")


def _clean_up_tokenization(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text
