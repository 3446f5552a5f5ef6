"""Functions of the original LLaVA training code, loaded from the llava-torch wheel's source files.

`llava/train/train.py` and `llava/train/llava_trainer.py` do not import on transformers 5 (they need
`transformers.trainer.ALL_LAYERNORM_LAYERS`, deepspeed, the original model classes). The functions the
tests compare with (`preprocess_*`, the length-grouped samplers) use none of that: their definitions
are taken from the source file as written (by name, with `ast`) and run in a namespace holding only
what they refer to (torch, the original `conversation` module, `tokenizer_image_token`, constants).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import types

import torch
from llava import conversation as conversation_lib
from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava.mm_utils import tokenizer_image_token


def _source_path(module: str) -> str:
    spec = importlib.util.find_spec("llava")
    return os.path.join(os.path.dirname(spec.origin), *module.split(".")[1:]) + ".py"


def load_functions(module: str, names: list[str], namespace: dict) -> types.SimpleNamespace:
    """The named top-level functions and classes of `module`'s source, defined in `namespace`."""
    path = _source_path(module)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    assert not missing, f"{path} no longer defines {missing}"
    for node in nodes:
        node.decorator_list = []
        if isinstance(node, ast.FunctionDef):
            node.returns = None
            for arg in node.args.args:
                arg.annotation = None
    code = compile(ast.Module(body=nodes, type_ignores=[]), path, "exec")
    exec(code, namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in names})


def train_functions(tokenizers_newer_than_0_14: bool = True) -> types.SimpleNamespace:
    """preprocess, preprocess_plain, preprocess_v1, preprocess_llama_2, preprocess_mpt, preprocess_multimodal,
    with `conversation_lib.default_conversation` set by the caller (as the original's train() does)."""
    namespace = {
        "torch": torch, "copy": copy, "conversation_lib": conversation_lib, "tokenizer_image_token": tokenizer_image_token,
        "IGNORE_INDEX": IGNORE_INDEX, "IMAGE_TOKEN_INDEX": IMAGE_TOKEN_INDEX, "DEFAULT_IMAGE_TOKEN": DEFAULT_IMAGE_TOKEN,
        "DEFAULT_IM_START_TOKEN": DEFAULT_IM_START_TOKEN, "DEFAULT_IM_END_TOKEN": DEFAULT_IM_END_TOKEN,
        "IS_TOKENIZER_GREATER_THAN_0_14": tokenizers_newer_than_0_14,
    }  # fmt: skip
    names = ["preprocess", "preprocess_plain", "preprocess_v1", "preprocess_llama_2", "preprocess_mpt",
             "preprocess_multimodal", "_tokenize_fn", "_mask_targets", "_add_speaker_and_signal"]  # fmt: skip
    return load_functions("llava.train.train", names, namespace)


def trainer_functions(randperm=None) -> types.SimpleNamespace:
    """split_to_even_chunks, get_length_grouped_indices, get_modality_length_grouped_indices.

    randperm(n) -> a permutation replaces `torch.randperm` in them (to feed both implementations the
    same random draws); by default torch's own.
    """
    shim = torch if randperm is None else types.SimpleNamespace(randperm=lambda n, generator=None: torch.as_tensor(randperm(n)))
    names = ["split_to_even_chunks", "get_length_grouped_indices", "get_modality_length_grouped_indices"]
    return load_functions("llava.train.llava_trainer", names, {"torch": shim})
