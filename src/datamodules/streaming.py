"""Training rows prepared on the fly from a streamed corpus, split across ranks and workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset, get_worker_info


class RowStream(Protocol):
    """What the dataset reads from (a ``BaseDataModule``)."""

    def stream_rows(self, skip: int) -> Iterator[dict[str, Any]]:
        """Training rows prepared on the fly, after the first ``skip`` examples."""
        ...


class StreamingDataset(IterableDataset):
    """Rows of ``datamodule.stream_rows``; rank r of w (and each loader worker) takes every
    w-th row, so every rank reads (and prepares) the whole stream. Its state is the number of
    rows already yielded, so a resumed run continues where the interrupted one stopped."""

    def __init__(self, datamodule: RowStream, skip: int = 0) -> None:
        self.datamodule = datamodule
        self.skip = skip
        self.rank: int | None = None  # set from the trainer; else from torch.distributed
        self.world_size = 1
        self.yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = (self.rank, self.world_size) if self.rank is not None else (0, 1)
        if (
            self.rank is None
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        resume_at, self._resume_at, self.yielded = self._resume_at, 0, 0
        mine = None
        for i, row in enumerate(self.datamodule.stream_rows(self.skip)):
            if i % world == rank:
                mine = row
            # a rank's row goes out once its group of `world` rows is complete, so every rank
            # gets the same number of rows (an incomplete last group goes to none)
            if i % world == world - 1:
                self.yielded += 1
                if self.yielded > resume_at:
                    yield mine

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = state["yielded"]
