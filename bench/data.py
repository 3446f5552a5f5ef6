"""Data pipeline throughput: LlavaDataset (grain worker processes) vs a plain single-process loop.

Both build the same batches from the same 640x480 JPEGs (written here with Pillow) and the same
LLaVA instruction records: decode, preprocess (336px CLIP, pad-to-square as LLaVA-1.5; or anyres
tiling), tokenize, mask labels, pad and stack. Prints samples/s for each and their ratio, one JSON
line per mode at the end. The two alternate over a few rounds (the median is reported), so load
from other processes hits both alike; the pipeline is timed once every worker has started.

    python bench/data.py                      # both modes, 2 workers
    python bench/data.py --mode clip --images 256 --workers 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from llava_jax.config import LlavaConfig
from llava_jax.data import tiny_tokenizer
from llava_jax.data.pipeline import DataConfig, LlavaDataset
from llava_jax.data.tokenizer import load_tokenizer

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
QUESTIONS = ("What is the colour of the circle?", "How many shapes are there?", "Describe the image briefly.")


def write_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """640x480 JPEGs with gradients, shapes and some noise (decode cost like photos, not flat colour)."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([(x * 255 // 640), (y * 255 // 480), ((x + y) * 255 // 1120)], -1).astype(np.int16)
        base += rng.integers(-20, 20, size=base.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, 560)), int(rng.integers(0, 400))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse((x0, y0, x0 + int(rng.integers(20, 80)), y0 + int(rng.integers(20, 80))), fill=colour)
        names.append(f"{i:05d}.jpg")
        image.save(os.path.join(folder, names[-1]), quality=90)
    return names


def write_records(path: str, names: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    records = []
    for i, name in enumerate(names):
        turns = []
        for t in range(rng.randint(1, 3)):
            question = rng.choice(QUESTIONS)
            turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            turns.append(
                {"from": "gpt", "value": " ".join(rng.choice(tiny_tokenizer.WORDS) for _ in range(rng.randint(5, 40)))}
            )
        records.append({"id": i, "image": name, "conversations": turns})
    with open(path, "w") as f:
        json.dump(records, f)


def anyres_token_count(size_hw: tuple[int, int]) -> int:
    """Stand-in count for the benchmark (the real one comes from the model's anyres rules)."""
    height, width = size_hw
    rows, cols = (2, 2) if abs(height - width) < min(height, width) else (1, 3)
    return 576 + rows * cols * 576 // 2


def measure_pipeline(dataset: LlavaDataset) -> tuple[float, float]:
    """(samples/s in steady state, start-up seconds): timing starts once every worker has delivered a batch."""
    warm = max(dataset.config.num_workers, 1)
    start = time.perf_counter()
    iterator = iter(dataset)
    for _ in range(warm):
        next(iterator)
    warmed = time.perf_counter()
    batches = sum(1 for _ in iterator)
    elapsed = time.perf_counter() - warmed
    iterator.close()
    assert batches + warm == dataset.batches_per_epoch * dataset.config.num_epochs
    return batches * dataset.config.batch_size / elapsed, warmed - start


def measure_loop(dataset: LlavaDataset) -> float:
    """The same batches built one after another in this process, without grain: samples/s."""
    maker, source = dataset._maker, dataset._source  # the pipeline's own per-batch work
    steps = dataset.batches_per_epoch * dataset.config.num_epochs
    start = time.perf_counter()
    for step in range(steps):
        maker(source[step])
    return steps * dataset.config.batch_size / (time.perf_counter() - start)


def run(mode: str, args, folder: str, data_path: str, tokenizer) -> dict:
    anyres = mode == "anyres"
    model_config = LlavaConfig(
        image_token_id=tokenizer.token_to_id("<image>"),
        image_aspect_ratio="anyres" if anyres else "pad",
        image_grid_pinpoints=PINPOINTS if anyres else None,
    )
    config = DataConfig(
        data_path=data_path,
        image_folder=folder,
        batch_size=args.batch_size,
        max_length=4096 if anyres else 2048,
        num_epochs=1,
        num_workers=args.workers,
        worker_buffer_size=2,
    )
    dataset = LlavaDataset(
        config, tokenizer=tokenizer, model_config=model_config, process_index=0, process_count=1,
        num_image_tokens=anyres_token_count if anyres else None,
    )  # fmt: skip
    # Alternate the two in rounds, so that load from other processes on the machine hits both alike.
    loops, pipelines, startups = [], [], []
    for _ in range(args.rounds):
        loops.append(measure_loop(dataset))
        rate, startup = measure_pipeline(dataset)
        pipelines.append(rate)
        startups.append(startup)
    ratios = [pipe / loop for pipe, loop in zip(pipelines, loops, strict=True)]
    result = {
        "bench": "data",
        "mode": mode,
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "loop_samples_per_s": round(statistics.median(loops), 1),
        "pipeline_samples_per_s": round(statistics.median(pipelines), 1),
        "pipeline_startup_s": round(statistics.median(startups), 2),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_per_round": [round(r, 2) for r in ratios],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(
        f"{mode:6s} loop {result['loop_samples_per_s']:7.1f} samples/s | "
        f"pipeline {result['pipeline_samples_per_s']:7.1f} samples/s "
        f"({args.workers} workers, start-up {result['pipeline_startup_s']:.1f} s) | "
        f"ratio {result['ratio']:.2f}x (rounds: {result['ratio_per_round']})"
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("clip", "anyres", "both"), default="both")
    parser.add_argument("--images", type=int, default=192, help="640x480 JPEGs to write and read")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop/pipeline measurements")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        names = write_images(folder, args.images)
        data_path = os.path.join(tmp, "data.json")
        write_records(data_path, names)
        tiny_tokenizer.write_llava_hf_tokenizer(
            os.path.join(tmp, "tokenizer"), tiny_tokenizer.train_sentencepiece(tiny_tokenizer.corpus(), 512)
        )
        tokenizer = load_tokenizer(os.path.join(tmp, "tokenizer"))
        modes = ("clip", "anyres") if args.mode == "both" else (args.mode,)
        results = [run(mode, args, folder, data_path, tokenizer) for mode in modes]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
