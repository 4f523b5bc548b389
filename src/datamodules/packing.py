"""Packing many examples into rows of ``max_length`` tokens without contaminating each other.

SFT rows are filled by best-fit-decreasing: no example is ever split across rows. Preference
pairs are packed alike, a pair (its chosen sequence, then its rejected one) being the unit.
Pretraining text is concatenated and cut into blocks. Each packed row records
``seq_lengths``, from which the collator restarts ``position_ids`` for every document (see
``collate.py``).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from itertools import accumulate

import numpy as np


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length at most ``capacity``.

    Examples are placed longest first, each into the open bin it fills most tightly; the open
    bins are kept in a sorted list keyed by their remaining room, so a placement is a binary
    search. Deterministic: ties go to the earlier example and the earlier bin.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the row length {capacity}")
    bins: list[list[int]] = []
    # keys remaining * stride + bin id: sorted by room, then by age
    stride = len(lengths) + 1
    open_bins: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        pos = bisect_left(open_bins, need * stride)
        if pos < len(open_bins):
            key = open_bins.pop(pos)
            room, b = divmod(key, stride)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            insort(open_bins, (room - need) * stride + b)
    return bins


def pack_rows(
    input_ids: list[list[int]],
    labels: list[list[int]],
    capacity: int,
    loss_weights: list[float] | None = None,
) -> dict[str, list[list]]:
    """Packed rows (``input_ids``, ``labels``, ``seq_lengths``) of best-fit-decreasing bins.

    With ``loss_weights`` (one per example), rows also get ``seq_weights``, one per document.
    """
    rows: dict[str, list[list]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    if loss_weights is not None:
        rows["seq_weights"] = []
    for members in best_fit_decreasing([len(x) for x in input_ids], capacity):
        rows["input_ids"].append([t for i in members for t in input_ids[i]])
        rows["labels"].append([t for i in members for t in labels[i]])
        rows["seq_lengths"].append([len(input_ids[i]) for i in members])
        if loss_weights is not None:
            rows["seq_weights"].append([float(loss_weights[i]) for i in members])
    return rows


PAIR_SIDES = ("chosen", "rejected")


PAIR_VALUES = ("loss_weight", "margin")  # per-pair columns, a list per packed row


def pack_pairs(columns: dict[str, list], capacity: int) -> dict[str, list[list]]:
    """Preference pairs packed whole into rows of at most ``capacity`` tokens.

    A row holds ``input_ids`` and ``labels`` of its pairs, each pair's chosen sequence then
    its rejected one, ``seq_lengths`` of those sequences (two per pair), and a list of each
    pair's value for every per-pair column the columns have (``PAIR_VALUES``: loss weight,
    margin). Pairs longer than a row raise ``ValueError``.
    """
    lengths = [
        len(c) + len(r)
        for c, r in zip(columns["chosen_input_ids"], columns["rejected_input_ids"], strict=True)
    ]
    longest = max(lengths, default=0)
    if longest > capacity:
        over = sum(n > capacity for n in lengths)
        raise ValueError(
            f"{over} preference pairs (chosen + rejected) are longer than the row length "
            f"{capacity}, the longest {longest} tokens"
        )
    values = [key for key in PAIR_VALUES if key in columns]
    rows: dict[str, list[list]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    rows |= {key: [] for key in values}
    for members in best_fit_decreasing(lengths, capacity):
        ids, labels, seq_lengths = [], [], []
        for i in members:
            for side in PAIR_SIDES:
                ids += columns[f"{side}_input_ids"][i]
                labels += columns[f"{side}_labels"][i]
                seq_lengths.append(len(columns[f"{side}_input_ids"][i]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["seq_lengths"].append(seq_lengths)
        for key in values:
            rows[key].append([float(columns[key][i]) for i in members])
    return rows


def cut_blocks(
    documents: list[list[int]], block_size: int, isolate: bool
) -> dict[str, list[list[int]]]:
    """Documents concatenated and cut into blocks of ``block_size`` (the last may be shorter).

    With ``isolate``, each block also records the lengths of the document pieces it holds,
    so that attention and positions restart at every document.
    """
    if not documents:
        return {"input_ids": []}
    flat = np.fromiter((t for d in documents for t in d), dtype=np.int64)
    starts = range(0, len(flat), block_size)
    rows: dict[str, list[list[int]]] = {
        "input_ids": [flat[s : s + block_size].tolist() for s in starts]
    }
    if isolate:
        ends = list(accumulate(len(d) for d in documents))
        rows["seq_lengths"] = [
            _piece_lengths(ends, s, min(s + block_size, len(flat))) for s in starts
        ]
    return rows


def _piece_lengths(doc_ends: list[int], start: int, stop: int) -> list[int]:
    """Lengths of the document pieces in tokens ``start:stop`` of the concatenation."""
    cuts = [start]
    i = bisect_left(doc_ends, start + 1)
    while i < len(doc_ends) and doc_ends[i] < stop:
        cuts.append(doc_ends[i])
        i += 1
    cuts.append(stop)
    return [b - a for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
