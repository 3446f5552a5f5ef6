"""`--to peft`: the adapters load with peft.PeftModel.from_pretrained on the --to hf base and match llava_jax."""

import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import llava_jax
from llava_jax.checkpoints import hf_export, peft_export
from llava_jax.errors import CheckpointError
from llava_jax.train import lora
from tests import reference as R
from tests.test_export_hf import CLIP, IMAGES, NEXT, TEXT, hf_source

RANK, ALPHA, DROPOUT = 4, 8.0, 0.05


def jitted_logits(model, inputs) -> np.ndarray:
    """The model's logits for pipe.prepare's inputs (NeXT image_sizes stay host values, closed over)."""
    graphdef, state = nnx.split(model)
    sizes = inputs.get("image_sizes")
    fn = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p, image_sizes=sizes))
    return np.asarray(fn(state, inputs["input_ids"], inputs["pixel_values"]))


def lora_pipe(src, targets=lora.DEFAULT_TARGETS):
    """The source model with random adapters (lora_b non-zero, so that they matter)."""
    pipe = llava_jax.load(src, dtype="float32")
    model = lora.apply_lora(pipe.model, rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=targets, rngs=nnx.Rngs(3))
    for i, (_, m) in enumerate(lora.lora_modules(model)):
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
    return pipe, model


def export_both(tmp_path, pipe, model):
    settings = lora.LoraSettings(rank=RANK, alpha=ALPHA, dropout=DROPOUT)
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    hf_export.export_hf(base_dir, lora.base_state(model), pipe.config, pipe.image_processor,
                        tokenizer_dir=pipe.directory, tokenizer=pipe.tokenizer)  # fmt: skip
    peft_export.export_peft(adapter_dir, model, pipe.config, settings, base_model_name_or_path=base_dir)
    return base_dir, adapter_dir


@pytest.mark.parametrize("next_", [False, True], ids=["llava", "llava_next"])
def test_peft_model_on_exported_base_equals_unmerged_lora(tmp_path, make_tokenizer_dir, next_):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), next_, NEXT if next_ else CLIP)
    targets = lora.DEFAULT_TARGETS + r"|projector/linears/0"
    pipe, model = lora_pipe(src, targets)
    base_dir, adapter_dir = export_both(tmp_path, pipe, model)
    inputs = pipe.prepare(TEXT, IMAGES)
    ours = jitted_logits(model, inputs)

    base = transformers.AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32).eval()
    plain = R.reference_logits(base, inputs["input_ids"], inputs["pixel_values"],
                               **({"image_sizes": torch.as_tensor(inputs["image_sizes"])} if next_ else {}))  # fmt: skip
    assert np.abs(plain - ours).max() > 1e-2  # the adapters change the logits
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    kwargs = {"image_sizes": torch.as_tensor(inputs["image_sizes"])} if next_ else {}
    theirs = R.reference_logits(peft_model, inputs["input_ids"], inputs["pixel_values"], **kwargs)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # peft attached an adapter to exactly the modules we trained
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 7 * 3 + 1 and all("language_model" in n or "linear_1" in n for n in wrapped)
    # and merging on both sides agrees too
    lora.merge_lora(model)
    merged_ref = R.reference_logits(peft_model.merge_and_unload(), inputs["input_ids"], inputs["pixel_values"], **kwargs)
    np.testing.assert_allclose(jitted_logits(model, inputs), merged_ref, atol=1e-4, rtol=0)


def test_files_are_what_peft_itself_saves(tmp_path, make_tokenizer_dir):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, CLIP)
    pipe, model = lora_pipe(src)
    base_dir, adapter_dir = export_both(tmp_path, pipe, model)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        ours = json.load(f)
    # peft on the same base, configured as our file says, saves the same keys and shapes
    base = transformers.AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    reference = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=ours["target_modules"])
    ref_dir = str(tmp_path / "peft_ref")
    peft.get_peft_model(base, reference).save_pretrained(ref_dir)
    theirs = load_file(os.path.join(ref_dir, "adapter_model.safetensors"))
    got = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in got
    with open(os.path.join(ref_dir, "adapter_config.json")) as f:
        saved = json.load(f)
    for key, value in ours.items():
        assert saved[key] == value, key
    assert peft.LoraConfig.from_pretrained(adapter_dir).to_dict() == peft.LoraConfig.from_pretrained(ref_dir).to_dict()
    # the values: lora_A = lora_a.T of layer i
    q = model.decoder.layers.attn.q_proj
    np.testing.assert_array_equal(got["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"],
                                  np.asarray(q.lora_a[1]).T)  # fmt: skip
    np.testing.assert_array_equal(got["base_model.model.model.language_model.layers.2.self_attn.q_proj.lora_B.weight"],
                                  np.asarray(q.lora_b[2]).T)  # fmt: skip


def test_refusals(tmp_path, make_tokenizer_dir):
    src = hf_source(str(tmp_path / "src"), make_tokenizer_dir(), False, CLIP)
    pipe, model = lora_pipe(src)
    with pytest.raises(ValueError, match="LoRA adapters: merge them first"):
        hf_export.export_hf(str(tmp_path / "x"), nnx.state(model), pipe.config, pipe.image_processor, tokenizer_dir=None)
    with pytest.raises(CheckpointError, match="scale"):
        peft_export.export_peft(str(tmp_path / "y"), model, pipe.config, lora.LoraSettings(rank=RANK, alpha=1.0))
    lora.merge_lora(model)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        peft_export.export_peft(str(tmp_path / "z"), model, pipe.config, lora.LoraSettings(rank=RANK, alpha=ALPHA))
