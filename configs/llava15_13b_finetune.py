"""LLaVA-1.5-13B stage 2: visual instruction tuning on llava_v1_5_mix665k.json from the stage-1 run.

    python train.py --config configs/llava15_13b_finetune.py --workdir runs/llava15_13b_finetune
"""

from configs import common


def get_config():
    c = common.base(("finetune",))
    c.stages.finetune = common.llava15_finetune("runs/llava15_13b_pretrain")
    return c
