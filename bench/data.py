"""Data pipeline throughput: LlavaDataset (grain worker processes) vs a plain single-process loop.

Both build the same batches from the same 640x480 JPEGs (written here with Pillow) and the same
LLaVA instruction records: decode, preprocess (336px CLIP, pad-to-square as LLaVA-1.5; or anyres
tiling), tokenize, mask labels, pad and stack. Prints samples/s for each and their ratio, one JSON
line per mode at the end. The two alternate over a few rounds (the median is reported), so load
from other processes hits both alike; the pipeline is timed from when every worker has delivered a
batch to its last batch (stopping the workers at the end of the epoch, which a run that repeats the
data never does, is reported apart as shutdown). The CPU each side got is printed too: on a machine
shared with other work the ratio cannot exceed what the scheduler grants (Linux autogroup shares CPU
per session, not per process), so the ratio the measured CPU costs allow on idle cores is printed
as well (derived, not timed).

    python bench/data.py                      # both modes, 2 workers
    python bench/data.py --mode clip --images 256 --workers 2 --rounds 5
    python bench/data.py --mode packing       # padding fraction packed vs unpacked (no images; seconds)
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
import psutil
from PIL import Image, ImageDraw

from llava_jax.config import LlavaConfig
from llava_jax.data import tiny_tokenizer
from llava_jax.data.packing import padding_fraction
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


class _CpuMeter:
    """CPU seconds of this process and its workers; each is sampled while alive (workers exit at the end)."""

    def __init__(self):
        self._processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        self._last = {p.pid: 0.0 for p in self._processes}
        self._first = self.sample()

    def sample(self) -> float:
        for process in self._processes:
            try:
                times = process.cpu_times()
                self._last[process.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return sum(self._last.values())

    def spent(self) -> float:
        return self.sample() - self._first


def measure_pipeline(dataset: LlavaDataset) -> dict[str, float]:
    """Steady-state samples/s (timed once every worker has delivered a batch), start-up seconds, and
    the CPU the pipeline's processes got meanwhile (cores, and milliseconds per sample)."""
    warm = max(dataset.config.num_workers, 1)
    start = time.perf_counter()
    iterator = iter(dataset)
    for _ in range(warm):
        next(iterator)
    meter, warmed = _CpuMeter(), time.perf_counter()
    batches, cpu, last = 0, 0.0, warmed
    for _ in iterator:
        batches += 1
        cpu, last = meter.spent(), time.perf_counter()
    # Up to the last batch: the end of the epoch then waits for grain to stop its workers, which a
    # run that repeats the data (num_epochs=None) never does.
    shutdown = time.perf_counter() - last
    iterator.close()
    assert batches + warm == dataset.batches_per_epoch * dataset.config.num_epochs
    elapsed, samples = last - warmed, batches * dataset.config.batch_size
    return {"rate": samples / elapsed, "startup": warmed - start, "shutdown": shutdown, "cores": cpu / elapsed,
            "cpu_ms": 1e3 * cpu / samples}  # fmt: skip


def measure_loop(dataset: LlavaDataset) -> dict[str, float]:
    """The same batches built one after another in this process, without grain."""
    maker, source = dataset._maker, dataset._source  # the pipeline's own per-batch work
    steps = dataset.batches_per_epoch * dataset.config.num_epochs
    cpu, start = time.process_time(), time.perf_counter()
    for step in range(steps):
        maker(source[step])
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
    samples = steps * dataset.config.batch_size
    return {"rate": samples / elapsed, "cores": cpu / elapsed, "cpu_ms": 1e3 * cpu / samples}


def run(mode: str, args, folder: str, data_path: str, tokenizer) -> dict:
    anyres = mode == "anyres"
    model_config = LlavaConfig(
        image_token_id=tokenizer.token_to_id("<image>"),
        image_aspect_ratio="anyres" if anyres else "pad",
        image_grid_pinpoints=PINPOINTS if anyres else None,
        patch_merge_type="spatial_unpad" if anyres else "flat",
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
    )  # fmt: skip
    # Alternate the two in rounds, so that load from other processes on the machine hits both alike.
    loops, pipelines = [], []
    for _ in range(args.rounds):
        loops.append(measure_loop(dataset))
        pipelines.append(measure_pipeline(dataset))
    ratios = [pipe["rate"] / loop["rate"] for pipe, loop in zip(pipelines, loops, strict=True)]

    def median(runs, key, digits=1):
        return round(statistics.median(run[key] for run in runs), digits)

    result = {
        "bench": "data",
        "mode": mode,
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "loop_samples_per_s": median(loops, "rate"),
        "pipeline_samples_per_s": median(pipelines, "rate"),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_per_round": [round(r, 2) for r in ratios],
        "pipeline_startup_s": median(pipelines, "startup", 2),
        "pipeline_shutdown_s": median(pipelines, "shutdown", 2),
        # CPU each side actually got (other processes on a shared machine take the rest) and spent.
        "loop_cores": median(loops, "cores", 2),
        "pipeline_cores": median(pipelines, "cores", 2),
        "loop_cpu_ms_per_sample": median(loops, "cpu_ms", 2),
        "pipeline_cpu_ms_per_sample": median(pipelines, "cpu_ms", 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    # What the measured CPU costs allow when the pipeline gets its cores to itself (derived, not timed).
    parallel = min(args.workers, os.cpu_count() or 1)
    result["ratio_if_cores_idle"] = round(
        parallel * result["loop_cpu_ms_per_sample"] / result["pipeline_cpu_ms_per_sample"], 2
    )
    print(
        f"{mode:6s} loop {result['loop_samples_per_s']:7.1f} samples/s | "
        f"pipeline {result['pipeline_samples_per_s']:7.1f} samples/s "
        f"({args.workers} workers, start-up {result['pipeline_startup_s']:.1f} s, "
        f"shutdown {result['pipeline_shutdown_s']:.1f} s) | "
        f"ratio {result['ratio']:.2f}x (rounds: {result['ratio_per_round']}) | "
        f"cores used: loop {result['loop_cores']:.2f}, pipeline {result['pipeline_cores']:.2f} | "
        f"CPU ms/sample: loop {result['loop_cpu_ms_per_sample']:.2f}, "
        f"pipeline {result['pipeline_cpu_ms_per_sample']:.2f} (if cores idle: {result['ratio_if_cores_idle']:.2f}x)"
    )
    return result


# llava_v1_5_mix665k by part (counts from the LLaVA-1.5 paper, Table 7): (examples, has an image, median
# text tokens, log-normal sigma). The text lengths are assumptions shaped like the data (short multi-turn
# VQA, longer LLaVA-Instruct conversations, long ShareGPT text capped at 2048), not measured on it.
MIX665K = {
    "llava_instruct": (158_000, True, 280, 0.6), "sharegpt": (40_000, False, 900, 0.8),
    "vqav2": (83_000, True, 120, 0.5), "gqa": (72_000, True, 110, 0.5), "okvqa": (9_000, True, 40, 0.4),
    "ocrvqa": (80_000, True, 90, 0.5), "a_okvqa": (66_000, True, 60, 0.4), "textcaps": (22_000, True, 40, 0.4),
    "refcoco": (48_000, True, 150, 0.5), "vg": (86_000, True, 160, 0.5),
}  # fmt: skip
IMAGE_TOKENS = 576  # LLaVA-1.5: CLIP-L/14 at 336 px


def mix665k_lengths(num: int, seed: int = 0, max_length: int = 2048) -> np.ndarray:
    """Token counts of `num` examples drawn in the proportions of MIX665K, shuffled."""
    rng = np.random.default_rng(seed)
    total = sum(part[0] for part in MIX665K.values())
    lengths = []
    for count, image, median, sigma in MIX665K.values():
        n = round(num * count / total)
        text = np.exp(rng.normal(np.log(median), sigma, n)).astype(int)
        lengths.append(np.clip(text + IMAGE_TOKENS * image, 16, max_length))
    lengths = np.concatenate(lengths)
    rng.shuffle(lengths)
    return lengths


def packing_report(num: int, batch_size: int, max_length: int = 2048) -> dict:
    """Padding fraction of a mix665k-shaped length mix: unpacked batches padded to their longest,
    padded to max_length (static shapes), and packed into rows of max_length."""
    lengths = mix665k_lengths(num, max_length=max_length)
    result = {
        "mode": "packing", "examples": int(len(lengths)), "max_length": max_length, "batch_size": batch_size,
        "mean_length": round(float(lengths.mean()), 1),
        "padding_unpacked_to_batch_longest": padding_fraction(lengths, batch_size, max_length, None),
        "padding_unpacked_to_max_length": float(1 - lengths.mean() / max_length),
        "padding_packed_first_fit": padding_fraction(lengths, batch_size, max_length, "first_fit"),
        "padding_packed_best_fit": padding_fraction(lengths, batch_size, max_length, "best_fit"),
    }  # fmt: skip
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"padding fraction on {num} mix665k-shaped examples (mean {result['mean_length']} tokens): unpacked "
          f"{result['padding_unpacked_to_batch_longest']:.1%} (batches of {batch_size} padded to their longest), "
          f"{result['padding_unpacked_to_max_length']:.1%} (padded to {max_length}); packed first-fit "
          f"{result['padding_packed_first_fit']:.1%}, best-fit {result['padding_packed_best_fit']:.1%}")  # fmt: skip
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("clip", "anyres", "both", "packing"), default="both")
    parser.add_argument("--images", type=int, default=768,
                        help="640x480 JPEGs to write and read (enough that start-up and the epoch's tail do not dominate)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating loop/pipeline measurements")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=20_000, help="--mode packing: examples drawn")
    args = parser.parse_args()
    if args.mode == "packing":
        print(json.dumps(packing_report(args.examples, args.batch_size)))
        return
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
