"""A tiny LLaVA learns to see, from scratch, on this CPU: both stages, then held-out questions.

    python train.py --config configs/demo.py --workdir runs/demo

Before training, `llava_jax.demo.prepare` writes the synthetic shapes data (`llava_jax.data.synthetic`:
48 px images, one shape per 16 px cell) and a tokenizer trained on it into the workdir, unless they are
there. Stage 1 ("pretrain", plain template, 4 epochs, lr 2e-3) trains every parameter on captions that name
each shape's cell; stage 2 ("finetune", mistral_instruct, no system prompt, 5 epochs, lr 1e-3) on one question
per record with a one-word answer: colour and shape asked by cell ("What color is the shape in the top left?"),
position by colour ("Which column is the red shape in?"), count. Afterwards `llava_jax.demo.evaluate` asks the
held-out questions with the real image and with a blank one; the summary's "evaluation" holds the accuracies.

Measured (2026-12-01, this config, 500 + 1560 steps; the machine shared, `uptime` load 4-7 on 2 cores, a second
run in parallel for its first 11 minutes): 1034 s wall (17 min; 516 s user + 174 s system CPU), held-out
accuracy 0.525 with the images and 0.28 with blank ones; count 1.00, shape 0.75, colour 0.38, position 0.24
(blank: count 0.00, shape 0.35, colour 0.22, position 0.37). The 90% target is NOT met. Earlier variants on the
same data: multi-turn (2-3 questions per record, max_length 72), stage-2 lr 2e-3, 4+10 epochs: 0.46 (colour
0.45, shape 0.49, position 0.24); 3+6 epochs: 0.43; single-turn at stage-2 lr 2e-3 trained to a higher loss
than at 1e-3 (stopped). The trained model also misses about half of its own training questions (0.57 on
multi-turn), so this is under-fitting of the cell/colour binding, not over-fitting.
"""

import ml_collections

from configs import common

NUM_IMAGES = 4000
BATCH = 32
TEMPLATE = "mistral_instruct"


def model():
    return dict(
        # ViT: 48 px images, 16 px patches -> 9 image tokens (+ CLS, dropped by "default")
        vision=dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, image_size=48, patch_size=16,
                    hidden_act="gelu"),
        # the demo tokenizer has 448 pieces + <image> (448) and <pad> (449); the table is padded to 512
        text=dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=4,
                  head_dim=32, max_position_embeddings=256),
        projector_type="mlp2x_gelu", vision_feature_layer=-2, image_token_id=448, image_aspect_ratio="square",
        # prompts are tokenized as the trainer's data pipeline tokenized them (the original's tokenizer_image_token:
        # the text after <image> starts with its own "▁"); with "hf", inference prompts lack that token, every
        # image token sits one position nearer the answer than in training, and "left, middle or right" comes out one
        # column off
        semantics="original",
    )  # fmt: skip


def stage(init_kind, template, max_length, epochs, lr):
    return common.stage(
        init=dict(kind=init_kind), model=model() if init_kind == "scratch" else {},
        data=dict(template=template, max_length=max_length, length_buckets=(max_length,), num_workers=0),
        global_batch_size=BATCH, epochs=epochs,
        trainable=((".*", lr),),  # vision tower included: it starts from nothing
    )  # fmt: skip


def get_config():
    c = common.base(("pretrain", "finetune"))
    c.log_every = 25
    c.keep_checkpoints = 1
    c.compute_dtype = "float32"
    c.remat = "none"
    c.mesh.data = 1
    c.prepare = "llava_jax.demo:prepare"
    c.evaluate = "llava_jax.demo:evaluate"
    c.demo = ml_collections.ConfigDict(dict(num_images=NUM_IMAGES, num_heldout=400, template=TEMPLATE,
                                            eval_batch_size=200))  # fmt: skip
    c.stages.pretrain = stage("scratch", "plain", 41, 4, 2e-3)
    c.stages.finetune = stage("previous", TEMPLATE, 32, 5, 3e-4)
    return c
