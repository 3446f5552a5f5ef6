"""Exports of a training run's workdir: `--to hf` (LoRA merged) and `--to peft` (the adapters) agree with the run."""

import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import llava_jax
from llava_jax import convert
from llava_jax.errors import CheckpointError
from llava_jax.train import lora
from tests import reference as R
from tests.train_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "USER: <image>\nWhat colour is this? ASSISTANT:"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_dir):
    """A tiny run whose one stage trains LoRA adapters (rank 4) and the projector for a few steps."""
    files, images = write_dataset(str(tmp_path_factory.mktemp("data")), num=8)
    workdir = str(tmp_path_factory.mktemp("run"))
    args = [f"--workdir={workdir}", "--config", os.path.join(ROOT, "configs", "tiny.py"),
            f"--config.stages.main.data.files={files}", f"--config.stages.main.data.image_folder={images}",
            f"--config.stages.main.init.tokenizer={tokenizer_dir}", "--config.stages.main.epochs=1",
            "--config.stages.main.lora.rank=4", "--config.stages.main.lora.lr=0.01",
            "--config.stages.main.trainable=((r'projector/.*', 0.001),)"]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_run_exports_to_hf_and_peft(lora_run, tmp_path):
    model, _, settings = convert.lora_run_model(lora_run, "float32")
    assert settings.rank == 4
    assert any(np.abs(np.asarray(m.lora_b[...])).max() > 0 for _, m in lora.lora_modules(model))  # trained
    hf_dir, adapter_dir = str(tmp_path / "hf"), str(tmp_path / "adapter")
    convert.to_hf(lora_run, hf_dir, dtype="float32", progress=False)
    convert.to_peft(lora_run, adapter_dir, dtype="float32", base_model=hf_dir)
    pipe = llava_jax.load(lora_run, dtype="float32")
    inputs = pipe.prepare(TEXT, [R.image((32, 32), seed=3)])
    ours = pipe.logits(**inputs)  # the run loaded with its adapters merged
    graphdef, state = nnx.split(model)
    unmerged = np.asarray(jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, inputs["input_ids"],
                                                                               inputs["pixel_values"]))  # fmt: skip
    np.testing.assert_allclose(unmerged, ours, atol=1e-4, rtol=0)
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    theirs = processor(text=TEXT, images=[R.image((32, 32), seed=3)], return_tensors="np")
    np.testing.assert_array_equal(theirs["input_ids"], inputs["input_ids"])
    np.testing.assert_array_equal(theirs["pixel_values"], inputs["pixel_values"])
    merged = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    np.testing.assert_allclose(R.reference_logits(merged, theirs["input_ids"], theirs["pixel_values"]), ours,
                               atol=1e-4, rtol=0)  # fmt: skip
    # peft on the run's base export (adapters left out) gives the unmerged model's logits
    base_dir = str(tmp_path / "base")
    convert.to_hf(lora_run, base_dir, dtype="float32", lora="base", progress=False)
    base = transformers.AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32).eval()
    with_adapters = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    np.testing.assert_allclose(R.reference_logits(with_adapters, theirs["input_ids"], theirs["pixel_values"]), unmerged,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_peft_export_needs_a_lora_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a training run's workdir"):
        convert.to_peft(str(tmp_path), str(tmp_path / "out"))
