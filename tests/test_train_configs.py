"""The shipped configs load, name their data, and lay their batches out on common meshes."""

import glob
import importlib.util
import os

import pytest

from llava_jax.errors import ConfigError
from llava_jax.train import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
RECIPES = [p for p in CONFIGS if os.path.basename(p).startswith("llava1")]


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", RECIPES + [os.path.join(ROOT, "configs", "tiny.py")], ids=os.path.basename)
def test_config_has_the_common_fields_and_checks(path):
    cfg = load(path)
    stages.check(cfg)
    for field in ("seed", "max_steps", "log_every", "checkpoint_every"):
        assert field in cfg
    assert set(cfg.mesh) >= {"data", "fsdp", "tensor"}


def test_llava15_recipes_match_the_original_scripts():
    pre = load(os.path.join(ROOT, "configs", "llava15_7b_pretrain.py")).stages.pretrain
    assert (pre.data.template, pre.global_batch_size, pre.trainable, pre.data.max_length) == \
        ("plain", 256, ((r"projector/.*", 1e-3),), 2048)  # fmt: skip
    assert pre.data.files.endswith("blip_laion_cc_sbu_558k.json") and pre.warmup_ratio == 0.03 and pre.weight_decay == 0
    fine = load(os.path.join(ROOT, "configs", "llava15_13b_finetune.py")).stages.finetune
    assert (fine.data.template, fine.global_batch_size, fine.data.image_aspect_ratio) == ("vicuna_v1", 128, "pad")
    assert fine.data.files.endswith("llava_v1_5_mix665k.json") and fine.data.group_by_modality_length
    lora = load(os.path.join(ROOT, "configs", "llava15_7b_lora.py")).stages.finetune
    assert (lora.lora.rank, lora.lora.alpha, lora.lora.dropout, lora.lora.lr) == (128, 256.0, 0.05, 2e-4)
    nxt = load(os.path.join(ROOT, "configs", "llava16_7b_finetune.py")).stages.finetune
    assert nxt.data.max_length == 4096 and (r"vision/.*", 2e-6) in nxt.trainable


@pytest.mark.parametrize("devices, accumulation", [(1, 8), (8, 1)])
def test_batch_geometry_follows_from_the_mesh(devices, accumulation):
    fine = load(os.path.join(ROOT, "configs", "llava15_7b_finetune.py")).stages.finetune
    geometry = stages.batch_geometry(fine, "finetune", devices)
    assert (geometry.per_device, geometry.accumulation, geometry.host_batch) == (16, accumulation, 128)


def test_missing_data_files_name_the_field():
    fine = load(os.path.join(ROOT, "configs", "llava15_7b_finetune.py")).stages.finetune
    with pytest.raises(Exception, match="stages.finetune.data.files"):
        stages.data_files(fine, "finetune")
    with pytest.raises(ConfigError, match="not divisible"):
        stages.batch_geometry(fine, "finetune", 3)
