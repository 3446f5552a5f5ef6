"""Which records go into which batch on which host, per epoch: shuffling, LLaVA's length grouping, sharding.

The order is a pure function of (lengths, seed, epoch, batch geometry), so every host computes the
same global order and takes its own rows, and a resumed run recomputes exactly what it would have read.

Grouping follows the original `group_by_modality_length` (llava_trainer.py): lengths are word counts,
positive for records with images and negative for text-only ones; each modality is shuffled, cut
into megabatches of `batch_size * num_hosts`, sorted longest-first inside a megabatch and dealt into
per-host batches of similar total length; megabatches of both modalities are then shuffled together,
and the two leftover partial megabatches, merged and sorted by index, go last (up to two megabatches'
worth less two: the batches after it take what is left). With only one modality present it
is plain length grouping of the signed lengths, as the original does (so text-only data is
ordered shortest first within a megabatch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def modality_length(record: dict) -> int:
    """The original's `modality_lengths` entry: words in the conversation, negative without an image.

    Malformed records count as one text-only word; they are rejected when their batch is built.
    """
    if not isinstance(record, dict):
        return -1
    turns = record.get("conversations")
    turns = turns if isinstance(turns, list) else []
    words = sum(len(t["value"].split()) for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str))
    words = max(words, 1)  # a zero length would have no modality
    return words if record.get("image") else -words


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def even_chunks(indices: Sequence[int], lengths: np.ndarray, num_chunks: int) -> list[list[int]]:
    """Deals `indices` (longest first) into `num_chunks` equal-count chunks of similar total length."""
    if len(indices) % num_chunks:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(int(index))
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_order(lengths: np.ndarray, megabatch: int, num_chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into `lengths`: shuffled, then grouped by length within each megabatch."""
    permutation = rng.permutation(len(lengths))
    order: list[int] = []
    for start in range(0, len(permutation), megabatch):
        group = sorted(permutation[start : start + megabatch].tolist(), key=lambda i: lengths[i], reverse=True)
        for chunk in even_chunks(group, lengths, num_chunks):
            order += chunk
    return np.asarray(order, dtype=np.int64)


def modality_grouped_order(
    signed_lengths: np.ndarray, megabatch: int, num_chunks: int, rng: np.random.Generator
) -> np.ndarray:
    """Record indices ordered as the original's modality + length grouped sampler."""
    signed_lengths = np.asarray(signed_lengths)
    lengths = np.abs(signed_lengths)
    multimodal = np.flatnonzero(signed_lengths > 0)
    text_only = np.flatnonzero(signed_lengths < 0)
    if len(multimodal) == 0 or len(text_only) == 0:  # as the original: the signed lengths (text-only: shortest first)
        return length_grouped_order(signed_lengths, megabatch, num_chunks, rng)
    groups = []
    for members in (multimodal, text_only):
        order = members[length_grouped_order(lengths[members], megabatch, num_chunks, rng)]
        groups.append([order[i : i + megabatch] for i in range(0, len(order), megabatch)])
    (*mm_full, mm_last), (*text_full, text_last) = groups
    megabatches = mm_full + text_full
    megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
    leftover = np.sort(np.concatenate([mm_last, text_last]))  # the original sorts it by index and puts it last
    return np.concatenate([*megabatches, leftover]).astype(np.int64)


def host_batches(
    order: np.ndarray, batch_size: int, process_index: int, process_count: int, drop_remainder: bool
) -> list[np.ndarray]:
    """This host's batches (record indices, at most `batch_size` each) from the global order.

    Every host gets the same number of batches: megabatch m holds hosts' batches side by side
    (host p takes rows [p*B, (p+1)*B)); a final partial megabatch is dealt round-robin, or dropped.
    """
    megabatch = batch_size * process_count
    batches = []
    for start in range(0, len(order), megabatch):
        group = order[start : start + megabatch]
        if len(group) == megabatch:
            batches.append(group[process_index * batch_size : (process_index + 1) * batch_size])
        elif not drop_remainder:
            batches.append(group[process_index::process_count])
    return batches
