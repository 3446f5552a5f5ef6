"""Training metrics: console progress bar (tqdm), TensorBoard (tensorboardX), WORKDIR/metrics.jsonl.

metrics.jsonl holds one JSON object per logged step: stage, step, loss (of that step's global batch),
learning_rate (the first trainable group's; learning_rates lists every group's), grad_norm (before
clipping), tokens_per_s (supervised tokens per second since the last log), step_time_s, mfu (null
without mfu_peak_tflops), and the counts of skipped records, non-finite steps and empty batches.
"""

from __future__ import annotations

import json
import os

import tqdm

METRICS_FILE = "metrics.jsonl"


def truncate(path: str, keep) -> None:
    """Rewrites metrics.jsonl keeping the records for which keep(record) holds (on resume: those logged
    before the restored checkpoint, so a resumed run's file equals an uninterrupted one's)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(path + ".tmp", "w") as f:
        for record in records:
            if keep(record):
                f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._tb.add_scalar(f"{record['stage']}/{key}", value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress(total: int, initial: int, stage: str, enabled: bool = True):
    return tqdm.tqdm(total=total, initial=initial, desc=stage, disable=not enabled, dynamic_ncols=True, leave=True)
