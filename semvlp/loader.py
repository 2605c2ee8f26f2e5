"""The input pipeline of a training loop: a step's batch built ahead, in DataLoader worker processes.

`StepLoader` yields the batches of a range of steps in step order. Each batch is a pure function of its
step (`build(step, rows, features_out)`), so any number of workers gives the same batches and a resumed
run the same ones as an uninterrupted run.

Region features, the bulk of a batch (36 x 2048 float16 per image: 38 MB at batch 256), are read into
a ring of buffers allocated once, in shared memory when there are workers, and handed over by slot
number. A fresh buffer per batch costs more than reading the features: the default DataLoader path
allocates new shared memory for every batch and takes a page fault for every 4 KB of it. A batch's
region features therefore stay valid only until the next batch is taken from the loader; the worker
that reuses a slot waits until the training loop has moved on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

# How long a worker waits for the training loop to release a slot before it gives up
SLOT_TIMEOUT_S = 600


@dataclass
class LoaderSettings:
    """How batches are built; not part of a job's identity: any setting gives the same batches."""

    num_workers: int = 0  # DataLoader worker processes; 0 builds each batch in the training process
    prefetch_factor: int = 2  # batches each worker builds ahead

    def __post_init__(self):
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch_factor >= 1, got {self.num_workers}, {self.prefetch_factor}")


class FeatureSlots:
    """The ring of region-feature buffers, with a busy flag per slot (shared with forked workers)."""

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, shared: bool):
        self.buffers = [torch.empty(shape, dtype=dtype) for _ in range(count)]
        self.busy = torch.zeros(count, dtype=torch.int32)
        if shared:  # before the workers fork: they write into the same pages the training loop reads
            for buffer in self.buffers:
                buffer.share_memory_()
            self.busy.share_memory_()

    def acquire(self, index: int) -> int:
        """The slot of the loader's index-th batch, once the training loop no longer reads it."""
        slot = index % len(self.buffers)
        deadline = time.monotonic() + SLOT_TIMEOUT_S
        while self.busy[slot]:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"feature buffer {slot} still in use after {SLOT_TIMEOUT_S} s: a batch's region features are "
                    "valid until the next batch is taken, and the training loop must not keep them longer"
                )
            time.sleep(0.0005)
        self.busy[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        self.busy[slot] = 0


class _StepBatches(torch.utils.data.Dataset):
    """Steps as a dataset of whole batches (a DataLoader with batch_size=None)."""

    def __init__(self, build: Callable, steps: range, rows: slice, slots: FeatureSlots):
        self.build, self.steps, self.rows, self.slots = build, steps, rows, slots

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        slot = self.slots.acquire(index)
        batch = self.build(self.steps[index], self.rows, self.slots.buffers[slot].numpy())
        del batch["region_feats"]  # it is the slot's buffer: the training process has it already
        batch["feature_slot"] = torch.tensor(slot)
        return batch


class StepLoader:
    """The batches of `steps` (this process's `rows` of each) in step order.

    build(step, rows, features_out) returns the batch, its region features written into features_out
    ([rows, K, D] of the features' dtype). The batches' region features stay valid until the next batch
    is taken.
    """

    def __init__(self, build: Callable, steps: range, rows: slice, features_shape: tuple[int, ...], features_dtype: torch.dtype,
                 settings: LoaderSettings, device: torch.device):
        workers = settings.num_workers
        # every slot a batch can be in: each worker's prefetched ones, one being consumed, one taken next
        count = workers * settings.prefetch_factor + 2
        self.slots = FeatureSlots(count, features_shape, features_dtype, shared=workers > 0)
        self.loader = torch.utils.data.DataLoader(
            _StepBatches(build, steps, rows, self.slots), batch_size=None, num_workers=workers,
            prefetch_factor=settings.prefetch_factor if workers else None, pin_memory=device.type == "cuda",
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        previous = None
        for batch in self.loader:
            if previous is not None:
                self.slots.release(previous)
            previous = int(batch.pop("feature_slot"))
            batch["region_feats"] = self.slots.buffers[previous]
            yield batch
        if previous is not None:
            self.slots.release(previous)


def numpy_dtype(dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype."""
    return torch.from_numpy(np.empty(0, dtype)).dtype
