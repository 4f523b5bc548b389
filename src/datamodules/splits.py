"""The validation split: a seeded fraction or count, optionally stratified."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence

from src.datamodules.records import DataError


def validation_count(n: int, val_split: float) -> int:
    """``val_split`` below 1 is a fraction of ``n``; from 1 up, a number of examples."""
    if val_split < 0:
        raise DataError(f"val_split must not be negative, got {val_split}")
    count = round(n * val_split) if val_split < 1 else int(val_split)
    if count >= n and n > 0:
        raise DataError(f"val_split={val_split} would hold out all {n} training examples; lower it")
    return count


def split_indices(
    n: int, val_split: float, seed: int, strata: Sequence[Hashable] | None = None
) -> tuple[list[int], list[int]]:
    """Indices of the training and validation examples, both in their original order.

    With ``strata`` (one key per example), every stratum gives the validation set its
    share, rounded by largest remainder, so small groups are represented too.
    """
    count = validation_count(n, val_split)
    rng = random.Random(seed)
    if count == 0:
        return list(range(n)), []
    if strata is None:
        held = rng.sample(range(n), count)
    else:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, key in enumerate(strata):
            groups[key].append(i)
        keys = sorted(groups, key=repr)
        quotas = {k: count * len(groups[k]) / n for k in keys}
        take = {k: int(q) for k, q in quotas.items()}
        by_remainder = sorted(keys, key=lambda k: quotas[k] - take[k], reverse=True)
        for k in by_remainder[: count - sum(take.values())]:
            take[k] += 1
        held = [i for k in keys for i in rng.sample(groups[k], take[k])]
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held_set)


def length_buckets(lengths: Sequence[int], n_buckets: int = 10) -> list[int]:
    """A quantile bucket (0..n_buckets-1) for each length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets = [0] * len(lengths)
    for rank, i in enumerate(order):
        buckets[i] = rank * n_buckets // max(1, len(lengths))
    return buckets
