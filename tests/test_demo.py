"""The README's demo runs and its checks hold."""

import json
import os
import subprocess
import sys


def test_tiny_demo(tmp_path):
    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_demo.py")
    run = subprocess.run([sys.executable, demo, f"--workdir={tmp_path}"], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": ""})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["max_abs_logit_diff_vs_transformers"] < 1e-4
    assert summary["greedy_tokens_equal_transformers"] is True
    assert summary["image_tokens"] == 16
