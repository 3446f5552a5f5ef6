"""Test-wide settings and shared fixtures (tiny LLaMA-style tokenizers written as llava-hf directories)."""

import os

# Several CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llava_jax.data import tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)

# Added tokens as llava-hf releases declare them (`<image>`, `<pad>` after the vocabulary), plus the
# ChatML markers that chatml_direct needs, as sentencepiece user-defined pieces (Yi's tokenizer has them).
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<image>", "<pad>", *CHATML_TOKENS)


@pytest.fixture(scope="session")
def sp_model_proto() -> bytes:
    lines = tiny_tokenizer.corpus(num_lines=400, seed=0)
    return tiny_tokenizer.train_sentencepiece(lines, vocab_size=512, user_defined_symbols=CHATML_TOKENS)


@pytest.fixture(scope="session")
def make_tokenizer_dir(tmp_path_factory, sp_model_proto):
    """make_tokenizer_dir(name, **write_llava_hf_tokenizer kwargs) -> directory (cached per name)."""
    made = {}

    def make(name: str = "llava-hf", **kwargs) -> str:
        if name not in made:
            directory = str(tmp_path_factory.mktemp(name))
            tiny_tokenizer.write_llava_hf_tokenizer(
                directory, sp_model_proto, added_tokens=kwargs.pop("added_tokens", ADDED_TOKENS), **kwargs
            )
            made[name] = directory
        return made[name]

    return make


@pytest.fixture(scope="session")
def tokenizer_dir(make_tokenizer_dir) -> str:
    """A llava-1.5-hf style directory (legacy: false), tokenizer.model without tokenizer.json."""
    return make_tokenizer_dir("llava-hf")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from llava_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
