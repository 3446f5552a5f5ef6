"""load_tokenizer gives transformers' ids for llava-hf, original-LLaVA and tokenizer.json directories."""

import json
import os
import pickle
import random
import shutil

import pytest
import sentencepiece
import transformers

from llava_jax.data.tokenizer import bpe_merges, load_tokenizer

_PIECES = (
    "<image>", "</s>", "<s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", " ", "  ", "\t", "USER:",
    " ASSISTANT:", "hello", "What is", "12", "3.5", "é", "中文", "[INST]", "<<SYS>>", "red circle", "\n\n", "?",
    "▁", "<im", "age>", "<0x41>",
)  # fmt: skip
_EDGES = (
    "", " ", "hello", " hello", "hello ", "  two spaces", "<image>", "<image>\nWhat is this?", " <image>", "x<image>y",
    "</s>USER: hi", "</s> hi", "a</s>", "USER: <image>\nWhat color? ASSISTANT: red</s>",
    "[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST] yo </s><s>[INST] more [/INST]",
    "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nhi<|im_end|>",
)  # fmt: skip


def _texts(n=300, seed=1):
    rng = random.Random(seed)
    random_texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return list(_EDGES) + random_texts


def _assert_same_as_transformers(directory):
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(directory)
    for text in _texts():
        ids = reference.encode(text)
        assert ours.encode(text) == ids, (text, reference.convert_ids_to_tokens(ids))
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.vocab_size == len(reference)
    assert ours.eos_id == reference.eos_token_id
    if reference.bos_token_id is not None:
        assert ours.bos_id == reference.bos_token_id
    assert ours.pad_id == (reference.pad_token_id if reference.pad_token_id is not None else reference.unk_token_id)
    for token in ("<image>", "<pad>", "</s>", "<|im_end|>"):
        if token in reference.get_vocab():
            assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token)
    return ours, reference


@pytest.mark.parametrize(
    "name, options",
    [
        ("llava-hf", {}),  # llava-1.5-hf: legacy false
        ("legacy", {"legacy": True}),  # the "▁" prefix after every special token
        ("no-legacy-key", {"legacy": None}),  # original LLaVA configs without the key (transformers 5: not legacy)
        ("eos-no-bos", {"add_bos_token": False, "add_eos_token": True}),
        ("no-pad", {"pad_token": None, "added_tokens": ("<image>", "<|im_start|>", "<|im_end|>")}),
    ],
)
def test_tokenizer_model_directories_match_transformers(make_tokenizer_dir, name, options):
    ours, _ = _assert_same_as_transformers(make_tokenizer_dir(name, **options))
    assert ours.adds_bos == options.get("add_bos_token", True)


def test_original_llava_directory_matches_transformers(tmp_path, tokenizer_dir):
    # As liuhaotian/llava-v1.5-7b ships it: transformers-4.30-era config with "__type" token dicts,
    # no added_tokens_decoder, pad null in the config and "<unk>" in special_tokens_map.json.
    shutil.copy(os.path.join(tokenizer_dir, "tokenizer.model"), tmp_path / "tokenizer.model")

    def token(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}  # fmt: skip

    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"), "eos_token": token("</s>"),
        "unk_token": token("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }  # fmt: skip
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, reference = _assert_same_as_transformers(str(tmp_path))
    assert ours.pad_id == reference.pad_token_id == 0
    with pytest.raises(KeyError):
        ours.token_to_id("<image>")  # original checkpoints have no <image> token; the model config decides


def test_llava_hf_directory_has_the_declared_ids(tokenizer_dir, tokenizer):
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        declared = {entry["content"]: int(i) for i, entry in json.load(f)["added_tokens_decoder"].items()}
    size = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(tokenizer_dir, "tokenizer.model")
    ).get_piece_size()
    assert declared["<image>"] == size and declared["<pad>"] == size + 1
    for content, token_id in declared.items():
        assert tokenizer.token_to_id(content) == token_id
        assert tokenizer.encode(content, add_bos=False) == [token_id]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, size + 1)
    assert tokenizer.encode("hi")[0] == 1 and tokenizer.encode("hi", add_bos=False)[0] != 1


def _tokenizer_json_dir(tmp_path, source_dir, *, legacy_normalizer, config_files):
    """A tokenizer.json as transformers writes it, optionally rewritten in transformers 4's legacy form."""
    saved = tmp_path / "saved"
    transformers.AutoTokenizer.from_pretrained(source_dir).save_pretrained(saved)
    with open(saved / "tokenizer.json") as f:
        serialized = json.load(f)
    if legacy_normalizer:  # what llava-hf's hub files carry: Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer
        serialized["normalizer"] = {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        }
        serialized["pre_tokenizer"] = None
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    with open(directory / "tokenizer.json", "w") as f:
        json.dump(serialized, f)
    for name in config_files:
        shutil.copy(os.path.join(source_dir, name), directory / name)
    return str(directory)


def test_llava_hf_tokenizer_json_with_configs_matches_transformers(tmp_path, tokenizer_dir):
    # transformers 5 rebuilds LlamaTokenizer's pre-tokenizer from the config and ignores the file's normalizer.
    config_files = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
    directory = _tokenizer_json_dir(tmp_path, tokenizer_dir, legacy_normalizer=True, config_files=config_files)
    ours, _ = _assert_same_as_transformers(directory)
    assert ours.encode("x<image>y") == load_tokenizer(tokenizer_dir).encode("x<image>y")


def test_bare_tokenizer_json_is_used_as_written(tmp_path, tokenizer_dir):
    directory = _tokenizer_json_dir(tmp_path, tokenizer_dir, legacy_normalizer=True, config_files=())
    ours, _ = _assert_same_as_transformers(directory)
    # The legacy normalizer puts "▁" after special tokens, unlike the non-legacy llava-hf directory.
    image = ours.token_to_id("<image>")
    assert ours.encode("<image>\nhi")[2] == ours.token_to_id("▁")
    assert load_tokenizer(tokenizer_dir).encode("<image>\nhi")[:2] == [1, image]
    assert ours.bos_id == 1  # read from its post-processor


def test_leading_space_follows_transformers_not_sentencepiece(tokenizer_dir, tokenizer):
    # The FACTS.md pitfall: sentencepiece encodes " hello" as "▁" + "▁hello..." (dummy prefix and the
    # space); transformers' Metaspace adds no prefix to text that starts with a space. We follow transformers.
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    assert tokenizer.encode(" hello", add_bos=False) == processor.encode("hello")
    assert processor.encode(" hello") != processor.encode("hello")
    for text in ("hello world", "\nWhat is", "USER: hi ASSISTANT:", "12 red"):  # no leading space: the same
        assert tokenizer.encode(text, add_bos=False) == processor.encode(text)


def test_merges_rebuild_every_piece(tokenizer_dir):
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    produced = {left + right for left, right in bpe_merges(vocab)}
    multi_char = {
        p for p in vocab if len(p) > 1 and not processor.is_byte(vocab[p]) and not processor.is_control(vocab[p])
    }
    multi_char -= {"<unk>", "<|im_start|>", "<|im_end|>"}
    assert multi_char <= produced


def test_offsets_cover_the_text(tokenizer):
    text = "USER: <image>\nWhat? ASSISTANT: 12 cats</s>"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert offsets[0] == (0, 0)  # BOS
    assert text[offsets[ids.index(tokenizer.eos_id)][0] :] == "</s>"
    assert all(start <= end for start, end in offsets)


def test_pickles(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    text = "USER: <image>\nhi</s>"
    assert clone.encode(text) == tokenizer.encode(text) and clone.pad_id == tokenizer.pad_id


def test_errors_name_the_problem(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(tokenizer_dir, bad)
    with open(bad / "tokenizer_config.json") as f:
        config = json.load(f)
    image = next(k for k, v in config["added_tokens_decoder"].items() if v["content"] == "<image>")
    config["added_tokens_decoder"][str(int(image) + 5)] = config["added_tokens_decoder"].pop(image)
    with open(bad / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="added token '<[a-z]+>' is declared with id 51[0-9] but lands on id"):
        load_tokenizer(str(bad))
    config["tokenizer_class"] = "GPT2Tokenizer"
    with open(bad / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(NotImplementedError, match="GPT2Tokenizer"):
        load_tokenizer(str(bad))
    with pytest.raises(KeyError, match="not in this tokenizer"):
        load_tokenizer(tokenizer_dir).token_to_id("<nope>")
