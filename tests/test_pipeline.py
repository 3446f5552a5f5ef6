"""LlavaDataset: batches, bad records, exact resume, host sharding, LLaVA's modality/length grouping."""

import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.config import LlavaConfig, VisionConfig
from llava_jax.data import sampling
from llava_jax.data.examples import IGNORE_INDEX, BadRecord, ExampleBuilder, FixedImageTokens
from llava_jax.data.image import ImageProcessor
from llava_jax.data.pipeline import DataConfig, ImageStep, LlavaDataset, load_records, pad_to_length

TOKENS_PER_IMAGE = 4  # a 28 px tile of 14 px patches


def _turns(question, answer, rounds=1):
    turns = []
    for r in range(rounds):
        turns += [{"from": "human", "value": question if r == 0 else "And then?"}, {"from": "gpt", "value": answer}]
    return turns


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """Records in a JSON and a JSONL file: good ones with 0, 1 or 2 images, and bad ones of each kind.

    Image i is a solid colour whose red channel is 8 * i mod 256, so a batch's pixels say which image they are.
    Returns (directory, data paths, {record index: expected skip reason}).
    """
    root = tmp_path_factory.mktemp("llava-data")
    (root / "images").mkdir()
    records = []

    def image(i, size=(20, 16)):
        name = f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
        Image.new("RGB", size, ((8 * i) % 256, 100, 50)).save(root / "images" / name)
        return name

    for i in range(30):
        kind = i % 5
        if kind in (0, 1, 2):  # one image, sizes vary
            records.append(
                {
                    "id": f"r{i}",
                    "image": image(i, (20 + i, 16 + i % 4)),
                    "conversations": _turns("<image>\nWhat colour?", f"Red number {i}.", rounds=1 + i % 3),
                }
            )
        elif kind == 3:  # text only
            records.append({"id": f"r{i}", "conversations": _turns("Say something.", "Something " * (1 + i % 4))})
        else:  # two images
            records.append(
                {
                    "id": f"r{i}",
                    "image": [image(i), image(100 + i)],
                    "conversations": _turns("Compare <image> and <image>.", "They differ."),
                }
            )
    # Bad records, each a different way to fail.
    (root / "images" / "garbage.jpg").write_bytes(b"this is not an image")
    full = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full, format="JPEG")
    (root / "images" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    bad_records = [
        ({"id": "missing", "image": "nope.jpg", "conversations": _turns("<image>\nHi", "Yo")}, "missing_image"),
        ({"id": "garbage", "image": "garbage.jpg", "conversations": _turns("<image>\nHi", "Yo")}, "corrupt_image"),
        ({"id": "truncated", "image": "truncated.jpg", "conversations": _turns("<image>\nHi", "Yo")}, "corrupt_image"),
        ({"id": "empty", "conversations": []}, "empty_conversation"),
        ({"id": "long", "conversations": _turns("Hi", "word " * 400)}, "too_long"),
        ({"id": "three", "image": [image(200), image(201), image(202)],
          "conversations": _turns("<image><image><image>", "Three.")}, "too_many_images"),
        ("not a record", "malformed"),
    ]  # fmt: skip
    for offset, (record, _) in zip((3, 8, 11, 17, 22, 26, 31), bad_records):
        records.insert(offset, record)
    bad = {records.index(r): reason for r, reason in bad_records}
    json_path, jsonl_path = root / "part1.json", root / "part2.jsonl"
    json_path.write_text(json.dumps(records[:20]))
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records[20:]))
    return str(root), (str(json_path), str(jsonl_path)), bad


@pytest.fixture(scope="module")
def model_config(tokenizer):
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28, patch_size=14)
    return LlavaConfig(vision=vision, image_token_id=tokenizer.token_to_id("<image>"), image_aspect_ratio="pad")


def _dataset(dataset_dir, tokenizer, model_config, **overrides):
    root, paths, _ = dataset_dir
    options = dict(
        data_path=paths, image_folder=os.path.join(root, "images"), batch_size=4, max_length=256,
        length_buckets=(64, 128, 256), max_images_per_example=2, num_epochs=2, num_workers=0, overlong="skip",
    )  # fmt: skip
    options.update(overrides)
    process = {k: options.pop(k) for k in ("process_index", "process_count") if k in options}
    process = {"process_index": 0, "process_count": 1, **process}
    return LlavaDataset(DataConfig(**options), tokenizer=tokenizer, model_config=model_config, **process)


def _good_indices(dataset_dir):
    _, paths, bad = dataset_dir
    return sorted(set(range(len(load_records(paths)))) - set(bad))


def test_every_good_record_once_per_epoch_and_bad_records_counted(dataset_dir, tokenizer, model_config):
    dataset = _dataset(dataset_dir, tokenizer, model_config)
    iterator = iter(dataset)
    batches = list(iterator)
    assert len(batches) == 2 * dataset.batches_per_epoch
    per_epoch = dataset.batches_per_epoch
    for epoch in range(2):
        seen = np.concatenate([b["example_index"] for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch]])
        seen = seen[seen >= 0].tolist()
        assert sorted(seen) == _good_indices(dataset_dir)  # each good record exactly once
    expected = collections.Counter(dataset_dir[2].values())
    assert iterator.stats["skipped"] == {reason: 2 * n for reason, n in expected.items()}
    assert iterator.stats["examples"] == 2 * len(_good_indices(dataset_dir))
    first = [b["example_index"].tolist() for b in batches[:per_epoch]]
    second = [b["example_index"].tolist() for b in batches[per_epoch:]]
    assert first != second  # reshuffled each epoch


def test_bad_records_raise_when_asked(dataset_dir, tokenizer, model_config):
    dataset = _dataset(dataset_dir, tokenizer, model_config, on_bad_record="raise", shuffle=False,
                       group_by_modality_length=False)  # fmt: skip
    with pytest.raises(BadRecord):
        list(iter(dataset))


def test_batch_layout(dataset_dir, tokenizer, model_config):
    root, paths, _ = dataset_dir
    records = load_records(paths)
    dataset = _dataset(dataset_dir, tokenizer, model_config, num_epochs=1)
    builder = ExampleBuilder(tokenizer, "vicuna_v1", model_config.image_token_id, FixedImageTokens(TOKENS_PER_IMAGE))
    image_id = model_config.image_token_id
    for batch in dataset:
        B, T = batch["input_ids"].shape
        assert B == 4 and T in (64, 128, 256)
        assert batch["pixel_values"].shape == (8, 3, 28, 28) and batch["pixel_values"].dtype == np.float32
        for key in ("input_ids", "labels", "attention_mask", "image_mask", "image_sizes", "example_index"):
            assert batch[key].dtype == np.int32, key
        lengths = batch["attention_mask"].sum(1)
        assert T == min(b for b in (64, 128, 256) if b >= lengths.max())
        slot = 0
        for row, index in enumerate(batch["example_index"].tolist()):
            n = lengths[row]
            assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][row, :n] == 1).all()
            if index < 0:
                assert n == 0
                continue
            record = records[index]
            names = [record["image"]] if isinstance(record.get("image"), str) else record.get("image", [])
            sizes = []
            for name in names:  # the row's images, in order, in the next slots
                with Image.open(os.path.join(root, "images", name)) as image:
                    sizes.append((image.height, image.width))
                    red = image.getpixel((0, 0))[0]
                assert batch["image_mask"][slot] == 1 and tuple(batch["image_sizes"][slot]) == sizes[-1]
                red_seen = (batch["pixel_values"][slot, 0, 14, 14] * 0.26862954 + 0.48145466) * 255  # centre
                assert abs(red_seen - red) < 3
                slot += 1
            example = builder(record, sizes)
            np.testing.assert_array_equal(batch["input_ids"][row, :n], example["input_ids"])
            np.testing.assert_array_equal(batch["labels"][row, :n], example["labels"])
            assert (batch["input_ids"][row] == image_id).sum() == TOKENS_PER_IMAGE * len(names)
        assert batch["image_mask"].sum() == slot
        assert not batch["pixel_values"][slot:].any() and not batch["image_sizes"][slot:].any()


def test_resume_yields_exactly_the_remaining_batches(dataset_dir, tokenizer, model_config):
    reference = [b for b in _dataset(dataset_dir, tokenizer, model_config)]
    dataset = _dataset(dataset_dir, tokenizer, model_config, num_workers=2)  # worker processes
    stop = dataset.batches_per_epoch + 1  # resume across an epoch boundary
    iterator = iter(dataset)
    try:
        head = [next(iterator) for _ in range(stop)]
        state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
        stats = iterator.stats
    finally:
        iterator.close()
    resumed = iter(dataset)
    try:
        resumed.set_state(state)
        tail = list(resumed)
        assert resumed.stats["batches"] == len(reference)
        # counting carried on from the saved counts: the whole run's skips, once per epoch each
        expected = collections.Counter(dataset_dir[2].values())
        assert resumed.stats["skipped"] == {reason: 2 * n for reason, n in expected.items()}
        assert stats["batches"] == stop
    finally:
        resumed.close()
    assert len(head) + len(tail) == len(reference)
    for got, want in zip(head + tail, reference):  # the same batches as in one process, in order
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_hosts_read_disjoint_slices_with_equal_batch_counts(dataset_dir, tokenizer, model_config):
    hosts = [
        _dataset(dataset_dir, tokenizer, model_config, num_epochs=1, process_index=p, process_count=2) for p in (0, 1)
    ]
    assert hosts[0].batches_per_epoch == hosts[1].batches_per_epoch
    seen = [np.concatenate([b["example_index"] for b in host]).tolist() for host in hosts]
    seen = [[i for i in indices if i >= 0] for indices in seen]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == _good_indices(dataset_dir)


def test_seeded_order(dataset_dir, tokenizer, model_config):
    def order(**overrides):
        return [
            b["example_index"].tolist()
            for b in _dataset(dataset_dir, tokenizer, model_config, num_epochs=1, **overrides)
        ]

    assert order(seed=3) == order(seed=3)
    assert order(seed=3) != order(seed=4)
    flat = [i for batch in order(shuffle=False, group_by_modality_length=False) for i in batch if i >= 0]
    assert flat == _good_indices(dataset_dir)


def test_repeats_forever_without_num_epochs(dataset_dir, tokenizer, model_config):
    dataset = _dataset(dataset_dir, tokenizer, model_config, num_epochs=None)
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(dataset.batches_per_epoch * 2 + 1)]
    assert len(batches) == dataset.batches_per_epoch * 2 + 1


def test_modality_grouping_follows_the_original_sampler():
    rng = np.random.default_rng(0)
    signed = rng.integers(1, 300, size=103) * np.where(rng.random(103) < 0.6, 1, -1)
    batch_size, hosts = 4, 2
    order = sampling.modality_grouped_order(signed, batch_size * hosts, hosts, sampling.epoch_rng(0, 0))
    assert sorted(order.tolist()) == list(range(103))
    megabatches = [order[i : i + 8] for i in range(0, len(order), 8)]
    mixed = [m for m in megabatches if len(set(np.sign(signed[m]))) > 1]
    assert len(mixed) <= 2  # only the merged leftovers of the two modalities mix
    for megabatch in megabatches:
        if len(megabatch) < 8 or len(set(np.sign(signed[megabatch]))) > 1:
            continue
        chunks = [megabatch[:4], megabatch[4:]]
        for chunk in chunks:  # each host batch is longest-first: the megabatch was sorted then dealt
            lengths = np.abs(signed[chunk])
            assert (np.diff(lengths) <= 0).all()
        # dealt greedily: host totals are closer than a split into the 4 longest vs the 4 shortest
        sorted_lengths = np.sort(np.abs(signed[megabatch]))[::-1]
        totals = [np.abs(signed[c]).sum() for c in chunks]
        assert abs(totals[0] - totals[1]) <= sorted_lengths[:4].sum() - sorted_lengths[4:].sum()
    again = sampling.modality_grouped_order(signed, 8, hosts, sampling.epoch_rng(0, 0))
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, sampling.modality_grouped_order(signed, 8, hosts, sampling.epoch_rng(0, 1)))


@pytest.mark.parametrize("seed", range(40))
def test_modality_grouping_is_the_originals_given_the_same_random_draws(seed):
    """The original get_modality_length_grouped_indices (llava_trainer.py, loaded from the wheel's source)
    with its torch.randperm fed the permutations our generator draws, in the same order: identical orders
    for mixed, image-only and text-only data, any batch size and host count."""
    from tests.original_source import trainer_functions

    r = np.random.default_rng(seed)
    n, batch_size, hosts = int(r.integers(1, 60)), int(r.integers(1, 6)), int(r.integers(1, 4))
    signs = [r.choice([-1, 1], n), np.ones(n, int), -np.ones(n, int)][seed % 3]
    signed = r.integers(1, 40, n) * signs
    ours = sampling.modality_grouped_order(signed, batch_size * hosts, hosts, sampling.epoch_rng(seed, 1))
    draws = sampling.epoch_rng(seed, 1)
    original = trainer_functions(randperm=draws.permutation).get_modality_length_grouped_indices(
        signed.tolist(), batch_size, hosts
    )
    assert ours.tolist() == list(original)


def test_modality_length_is_the_originals():
    record = {"image": "a.jpg", "conversations": [{"from": "human", "value": "a b  c"}, {"from": "gpt", "value": "d"}]}
    assert sampling.modality_length(record) == 4
    assert sampling.modality_length({"conversations": record["conversations"]}) == -4


@pytest.mark.parametrize("aspect_ratio", ["pad", "anyres"])
def test_image_step_is_the_model_image_processor(tmp_path, aspect_ratio):
    """The pipeline preprocesses a file exactly as pipe.image_processor does a loaded image."""
    path = tmp_path / "wide.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path)
    pinpoints = ((336, 672), (672, 336), (672, 672)) if aspect_ratio == "anyres" else None
    config = LlavaConfig(image_aspect_ratio=aspect_ratio, image_grid_pinpoints=pinpoints,
                         patch_merge_type="spatial_unpad" if pinpoints else "flat")  # fmt: skip
    step = ImageStep.from_config(config)
    pixels, size = step(str(path))
    expected = ImageProcessor.from_config(config)(Image.open(path))
    assert size == (480, 640) and tuple(expected["image_sizes"][0]) == size
    np.testing.assert_array_equal(pixels, expected["pixel_values"][0])
    assert step.pixel_shape == ((5, 3, 336, 336) if pinpoints else (3, 336, 336))


def test_pad_to_length():
    batch = {"input_ids": np.ones((2, 3), np.int32), "labels": np.ones((2, 3), np.int32),
             "attention_mask": np.ones((2, 3), np.int32), "image_mask": np.ones((4,), np.int32)}  # fmt: skip
    padded = pad_to_length(batch, 5, pad_id=9)
    assert padded["input_ids"][:, 3:].tolist() == [[9, 9]] * 2 and (padded["labels"][:, 3:] == IGNORE_INDEX).all()
    assert (padded["attention_mask"][:, 3:] == 0).all() and padded["image_mask"] is batch["image_mask"]
    with pytest.raises(ValueError, match="shorter"):
        pad_to_length(batch, 2, pad_id=9)


def test_config_errors():
    with pytest.raises(ValueError, match="length_buckets"):
        DataConfig(data_path="x.json", max_length=100, length_buckets=(50, 80))
    with pytest.raises(ValueError, match="on_bad_record"):
        DataConfig(data_path="x.json", on_bad_record="ignore")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(["/nonexistent/data.json"])


def test_state_plugs_into_grains_checkpoint_handler(tmp_path, dataset_dir, tokenizer, model_config):
    import grain
    from etils import epath

    dataset = _dataset(dataset_dir, tokenizer, model_config)
    handler = grain.checkpoint.CheckpointHandler()  # what orbax calls for a grain iterator
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    handler.save(epath.Path(tmp_path), item=iterator)
    expected = [b["example_index"].tolist() for b in iterator]
    restored = handler.restore(epath.Path(tmp_path), item=iter(dataset))
    assert [b["example_index"].tolist() for b in restored] == expected
    assert restored.stats["batches"] == 2 * dataset.batches_per_epoch


def test_anyres_batches_fit_the_model(dataset_dir, tokenizer):
    """With an anyres model, each batch's image tokens are exactly what the model makes of its images."""
    from llava_jax.model import anyres_merge

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=28, patch_size=14)
    config = LlavaConfig(vision=vision, image_token_id=tokenizer.token_to_id("<image>"), image_aspect_ratio="anyres",
                         image_grid_pinpoints=((28, 56), (56, 28), (56, 56)), patch_merge_type="spatial_unpad")  # fmt: skip
    dataset = _dataset(dataset_dir, tokenizer, config, num_epochs=1, max_length=512, length_buckets=(128, 512))
    seen_images = 0
    for batch in dataset:
        mask = batch["image_mask"].astype(bool)
        seen_images += mask.sum()
        assert batch["pixel_values"].shape[1:] == (5, 3, 28, 28)
        if not mask.any():
            continue
        pixels, sizes = batch["pixel_values"][mask], batch["image_sizes"][mask]
        index = anyres_merge.feature_index(config, sizes, pixels.shape[1], num_images=len(pixels))
        assert (batch["input_ids"] == config.image_token_id).sum() == len(index)
    assert seen_images > 10
