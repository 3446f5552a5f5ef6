"""LLaVA-1.6 (NeXT) 7B anyres stage 2: the vision tower trains too (lr 2e-6), max length 4096.

Starts from a LLaVA-1.5-7B stage-1 run (image_newline is created fresh). LLaVA-NeXT's own instruction
mix was not released in full; the config expects lmms-lab/LLaVA-NeXT-Data exported to LLaVA's JSON
format at playground/data/llava_next_779k.json with its images under playground/data.

    python train.py --config configs/llava16_7b_finetune.py --workdir runs/llava16_7b_finetune
"""

from configs import common
from configs.models import NEXT_PINPOINTS


def get_config():
    c = common.base(("finetune",))
    s = common.llava15_finetune("runs/llava15_7b_pretrain")
    s.model = dict(image_aspect_ratio="anyres", image_grid_pinpoints=NEXT_PINPOINTS, patch_merge_type="spatial_unpad")
    s.data.files = "playground/data/llava_next_779k.json"
    s.data.image_aspect_ratio = "anyres"
    s.data.max_length = 4096
    s.trainable = ((r"vision/.*", 2e-6), (r"projector/.*", 2e-5), (r"image_newline", 2e-5), (r"decoder/.*", 2e-5))
    c.stages.finetune = s
    return c
