"""Train LLaVA: `python train.py --config configs/X.py --workdir DIR [--config.a.b=v ...]`.

Runs the config's stages in order (`stage_order`); running the same command on the same DIR resumes
from the latest checkpoint, and a stage already done is skipped. SIGTERM saves a checkpoint and exits
cleanly. Writes DIR/metrics.jsonl, DIR/tensorboard/ and DIR/stages/<name>/; prints a JSON summary as
its last line. A mistake in the config or data is reported as one line, with exit status 2.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py); override fields with --config.a.b=v.",
                                lock_config=True)  # fmt: skip
flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, metrics, TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    from llava_jax.errors import UserError
    from llava_jax.train.loop import NonFiniteLoss, Preempted, train

    try:
        summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(0)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
