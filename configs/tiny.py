"""A tiny from-scratch LLaVA in one stage, for smoke runs and tests (seconds on a CPU).

    python train.py --config configs/tiny.py --workdir /tmp/tiny \
        --config.stages.main.data.files=DATA.json --config.stages.main.data.image_folder=IMAGES \
        --config.stages.main.init.tokenizer=TOKENIZER_DIR

The tokenizer directory must hold `<image>` (the model's image_token_id) and `<pad>`.
`configs/tiny.py:two_stages` runs a projector-only stage `pretrain` (plain template), then `finetune`
(everything trains) from it, both on the same data (override `stages.pretrain.data.*` and
`stages.finetune.data.*`).
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
    c = common.base(("main",))
    c.log_every = 1
    c.checkpoint_every = 100
    c.compute_dtype = "float32"
    c.remat = "none"
    c.progress = False
    c.stages.main = common.stage(
        model=dict(
            vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32, patch_size=16),
            text=dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=512),
            projector_type="mlp2x_gelu", vision_feature_layer=-2, image_token_id=512, image_aspect_ratio="square",
        ),
        data=dict(max_length=192, length_buckets=(192,), num_workers=0),
        global_batch_size=4, epochs=2, trainable=((".*", 1e-3),), warmup_ratio=0.1,
    )  # fmt: skip
    if arg == "two_stages":
        c.stage_order = ("pretrain", "finetune")
        pretrain = ml_collections.ConfigDict(c.stages.main.to_dict())
        pretrain.data.template = "plain"
        pretrain.trainable = (("projector/.*", 1e-3),)
        finetune = ml_collections.ConfigDict(c.stages.main.to_dict())
        finetune.init.kind = "previous"
        finetune.model = ml_collections.ConfigDict()
        c.stages = ml_collections.ConfigDict(dict(pretrain=pretrain, finetune=finetune))
    elif arg:
        raise ValueError(f"configs/tiny.py takes no argument or 'two_stages', got {arg!r}")
    return c
