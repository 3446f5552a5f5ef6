"""LLaVA-1.5-13B stage 1: projector pretraining on blip_laion_cc_sbu_558k.json (expects configs/common.py paths).

    python train.py --config configs/llava15_13b_pretrain.py --workdir runs/llava15_13b_pretrain
"""

from configs import common


def get_config():
    c = common.base(("pretrain",))
    c.stages.pretrain = common.llava15_pretrain(common.VICUNA_13B_DIR)
    return c
