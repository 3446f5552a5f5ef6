"""Training: train state, optimizer groups, loss, the jitted step, checkpoints, metrics and the stage loop.

`python train.py --config configs/X.py --workdir DIR` drives `loop.train`; `run_dir` reads a finished or
running workdir back (for `llava_jax.load(DIR)` and the exporters).
"""
