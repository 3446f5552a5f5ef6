"""Building blocks of the run configs: the top-level fields every config has, and one stage.

Field meanings: llava_jax/train/stages.py. Paths are local: nothing is downloaded.
"""

from __future__ import annotations

import ml_collections

# Where the LLaVA-1.5 recipes expect their inputs (the original repository's layout, playground/data).
CLIP_DIR = "checkpoints/clip-vit-large-patch14-336"  # openai/clip-vit-large-patch14-336
VICUNA_7B_DIR = "checkpoints/vicuna-7b-v1.5"  # lmsys/vicuna-7b-v1.5
VICUNA_13B_DIR = "checkpoints/vicuna-13b-v1.5"  # lmsys/vicuna-13b-v1.5
PRETRAIN_JSON = "playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
PRETRAIN_IMAGES = "playground/data/LLaVA-Pretrain/images"
FINETUNE_JSON = "playground/data/llava_v1_5_mix665k.json"
FINETUNE_IMAGES = "playground/data"  # coco/, gqa/, ocr_vqa/, textvqa/, vg/ under it

# Every linear layer of the language model but lm_head (the LoRA targets of the original's LoRA recipe).
LLM_LINEARS = r"decoder/layers/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def base(stage_order: tuple[str, ...]) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.max_steps = -1  # caps every stage at this many optimizer steps; -1: no cap (run the epochs)
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.max_nonfinite_in_a_row = 3
    c.compute_dtype = "bfloat16"
    c.param_dtype = "float32"  # float32 master weights; "bfloat16" trains in bfloat16 throughout
    c.remat = "full"
    c.loss_chunk = 64  # LM head + cross-entropy over the supervised positions, this many per chunk; 0: all positions
    c.mfu_peak_tflops = 0.0  # per-device matmul peak for the MFU column (0: leave it out)
    c.progress = True
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.stage_order = tuple(stage_order)
    c.stages = ml_collections.ConfigDict()
    return c


def stage(**fields) -> ml_collections.ConfigDict:
    """A stage with every field present (so any can be overridden on the command line)."""
    s = dict(
        init=dict(kind="scratch", path="", tokenizer="", vision_tower="", language_model="", mm_projector=""),
        model=dict(),
        data=dict(files="", image_folder="", template="vicuna_v1", max_length=2048, image_aspect_ratio="",
                  group_by_modality_length=False, num_workers=4, max_images_per_example=1, length_buckets=(),
                  packing="", examples_per_row=4),
        global_batch_size=128, per_device_batch_size=0, epochs=1, trainable=(), warmup_ratio=0.03,
        weight_decay=0.0, clip_norm=1.0,
        lora=dict(rank=0, alpha=16.0, dropout=0.0, target="", lr=0.0),
    )  # fmt: skip
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(s.get(key), dict):
            s[key] = {**s[key], **value}
        else:
            s[key] = value
    return ml_collections.ConfigDict(s)


def llava15_pretrain(language_model: str) -> ml_collections.ConfigDict:
    """LLaVA-1.5 stage 1 (scripts/v1_5/pretrain.sh): projector only on 558k captions."""
    return stage(
        init=dict(kind="components", vision_tower=CLIP_DIR, language_model=language_model),
        model=dict(projector_type="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select_strategy="default"),
        data=dict(files=PRETRAIN_JSON, image_folder=PRETRAIN_IMAGES, template="plain", max_length=2048,
                  image_aspect_ratio="square", group_by_modality_length=False),
        global_batch_size=256, per_device_batch_size=32, epochs=1, trainable=((r"projector/.*", 1e-3),),
        warmup_ratio=0.03, weight_decay=0.0,
    )  # fmt: skip


def llava15_finetune(start_run: str) -> ml_collections.ConfigDict:
    """LLaVA-1.5 stage 2 (scripts/v1_5/finetune.sh): projector + LLM on the 665k mix, vision tower frozen.

    Starts from a stage-1 run directory; to start from the released projector instead:
    --config.stages.finetune.init.kind=components --config.stages.finetune.init.vision_tower=CLIP
    --config.stages.finetune.init.language_model=VICUNA --config.stages.finetune.init.mm_projector=mm_projector.bin
    """
    return stage(
        init=dict(kind="run", path=start_run),
        data=dict(files=FINETUNE_JSON, image_folder=FINETUNE_IMAGES, template="vicuna_v1", max_length=2048,
                  image_aspect_ratio="pad", group_by_modality_length=True),
        global_batch_size=128, per_device_batch_size=16, epochs=1,
        trainable=((r"projector/.*", 2e-5), (r"decoder/.*", 2e-5)), warmup_ratio=0.03, weight_decay=0.0,
    )  # fmt: skip


def llava15_lora(start_run: str) -> ml_collections.ConfigDict:
    """LLaVA-1.5 LoRA stage 2 (scripts/v1_5/finetune_lora.sh): r 128, alpha 256, dropout 0.05 on every LLM linear
    but lm_head at lr 2e-4, the projector at 2e-5; the base LLM frozen."""
    s = llava15_finetune(start_run)
    s.lora = ml_collections.ConfigDict(dict(rank=128, alpha=256.0, dropout=0.05, target=LLM_LINEARS, lr=2e-4))
    s.trainable = ((r"projector/.*", 2e-5),)  # and the adapters at lora.lr; the base LLM stays frozen
    return s
