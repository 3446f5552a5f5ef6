"""LLaVA-1.5-13B LoRA stage 2 on llava_v1_5_mix665k.json from the stage-1 run (needs llava_jax.train.lora).

    python train.py --config configs/llava15_13b_lora.py --workdir runs/llava15_13b_lora
"""

from configs import common


def get_config():
    c = common.base(("finetune",))
    c.stages.finetune = common.llava15_lora("runs/llava15_13b_pretrain")
    return c
