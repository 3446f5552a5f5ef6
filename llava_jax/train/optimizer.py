"""AdamW with per-group learning rates chosen by parameter-path patterns; everything unmatched is frozen.

Groups are (regex, peak learning rate) pairs, big_vision style: a parameter belongs to the first group
whose regex matches its whole path ("decoder/layers/attn/q_proj/kernel", "projector/linears/0/bias",
...). Parameters no group matches are frozen: `split_params` leaves them out of the trainable tree, so
they get no gradient, no optimizer state, and take no part in the global-norm clipping.

Each group follows its own schedule: linear warmup from 0 to its peak over `warmup_steps`, then cosine
decay to 0 at `total_steps` (HF's get_cosine_schedule_with_warmup, which the original LLaVA uses).
Weight decay is decoupled (AdamW) and, as the HF Trainer does, applies to every parameter but biases
and norm scales.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import optax

from llava_jax.errors import ConfigError


def path_name(path) -> str:
    """'decoder/layers/attn/q_proj/kernel' from a jax tree path (dict keys and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree) -> list[tuple[str, object]]:
    return [(path_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclasses.dataclass(frozen=True)
class Groups:
    """Trainable groups: ((regex, peak lr), ...) in priority order."""

    patterns: tuple[tuple[str, float], ...]

    @classmethod
    def from_config(cls, pairs: Sequence, field: str = "trainable") -> Groups:
        out = []
        for pair in pairs or ():
            if len(pair) != 2:
                raise ConfigError(f"{field}: each entry must be a (regex, learning rate) pair, got {pair!r}")
            pattern, lr = pair
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{field}: {pattern!r} is not a regular expression ({e})") from None
            out.append((str(pattern), float(lr)))
        return cls(tuple(out))

    def group_of(self, name: str) -> int | None:
        """The index of the first group whose regex matches the whole path, None if frozen."""
        for i, (pattern, _) in enumerate(self.patterns):
            if re.fullmatch(pattern, name):
                return i
        return None

    def is_trainable(self, name: str) -> bool:
        return self.group_of(name) is not None


def split_params(params: dict, groups: Groups) -> tuple[dict, dict]:
    """Pure param dict -> (trainable, frozen), two dicts of the same nesting that partition the leaves."""

    def walk(tree, prefix):
        trainable, frozen = {}, {}
        for key, value in tree.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                t, f = walk(value, name)
                if t:
                    trainable[key] = t
                if f:
                    frozen[key] = f
            elif groups.is_trainable(name):
                trainable[key] = value
            else:
                frozen[key] = value
        return trainable, frozen

    return walk(params, "")


def merge_params(trainable: dict, frozen: dict) -> dict:
    """The inverse of `split_params`."""
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge_params(value, out.get(key, {})) if isinstance(value, dict) else value
    return out


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 -> peak linearly over warmup_steps, then cosine to 0 at total_steps (HF's cosine schedule)."""
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(peak, decay_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.cosine_decay_schedule(peak, decay_steps)],
        [warmup_steps],
    )


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """As HF's TrainingArguments.get_warmup_steps: ceil(total * ratio)."""
    import math

    return math.ceil(total_steps * warmup_ratio)


def _decays(name: str) -> bool:
    return name.rsplit("/", 1)[-1] not in ("bias", "scale")


def make_optimizer(trainable: dict, groups: Groups, *, total_steps: int, warmup_ratio: float,
                   weight_decay: float, clip_norm: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> tuple[optax.GradientTransformation, dict[int, optax.Schedule]]:  # fmt: skip
    """The optimizer of the trainable tree and each group's schedule.

    Clipping (when clip_norm > 0) is over the global norm of all trainable gradients, before the
    per-group AdamW. Returns (optimizer, {group index: schedule}).
    """
    names = dict(named_leaves(trainable))
    used = sorted({groups.group_of(n) for n in names})
    warm = warmup_steps(total_steps, warmup_ratio)
    schedules = {g: warmup_cosine(groups.patterns[g][1], warm, total_steps) for g in used}
    labels = jax.tree_util.tree_map_with_path(lambda p, _: str(groups.group_of(path_name(p))), trainable)

    def decay_mask(tree):  # a function: multi_transform hands each group a tree with other groups masked out
        return jax.tree_util.tree_map_with_path(lambda p, _: _decays(path_name(p)), tree)

    transforms = {
        str(g): optax.adamw(schedules[g], b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
        for g in used
    }
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm and clip_norm > 0 else []
    return optax.chain(*chain, optax.multi_transform(transforms, labels)), schedules
