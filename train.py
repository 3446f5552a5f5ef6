"""Train LLaVA: `python train.py --config configs/X.py --workdir DIR [--config.a.b=v ...]`.

Runs the config's stages in order (`stage_order`); running the same command on the same DIR resumes
from the latest checkpoint, and a stage already done is skipped. SIGTERM saves a checkpoint and exits
cleanly. With several hosts every host runs the same command (see --distributed). Writes
DIR/metrics.jsonl, DIR/tensorboard/ and DIR/stages/<name>/; prints a JSON summary as its last line. A mistake in the config or data is reported as one line, with exit status 2.
"""

from __future__ import annotations

import importlib
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py); override fields with --config.a.b=v.",
                                lock_config=True)  # fmt: skip
flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, metrics, TensorBoard events.")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Start jax.distributed (several processes, one per host): auto where JAX_COORDINATOR_ADDRESS "
                  "(with JAX_NUM_PROCESSES, JAX_PROCESS_ID) is set or SLURM / Open MPI run several tasks; yes on "
                  "TPU pod slices, where JAX finds the rest itself.")
flags.mark_flags_as_required(["config", "workdir"])


def call_hook(config, field: str, workdir: str):
    """config.<field>, a "module:function" name, called as function(config, workdir); None where unset.
    configs/demo.py uses `prepare` (write its data before training) and `evaluate` (score it after)."""
    name = config.get(field, "")
    if not name:
        return None
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    from llava_jax.errors import UserError
    from llava_jax.train import hosts
    from llava_jax.train.loop import NonFiniteLoss, Preempted, train

    hosts.initialize(flags.FLAGS.distributed)  # before anything touches a device
    try:
        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        call_hook(config, "prepare", workdir)
        summary = train(config, workdir)
        evaluation = call_hook(config, "evaluate", workdir)
        if evaluation is not None:
            summary["evaluation"] = evaluation
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
    from llava_jax.host_malloc import reexec_for_cpu

    reexec_for_cpu()  # on the CPU backend: glibc settings that keep XLA's step memory mapped (see the module)
    app.run(main)
