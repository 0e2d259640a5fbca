"""Map-style training data: rows of column arrays fetched a batch at a time, in a seeded order per epoch.

:func:`make_train_dataloader` is what every SQuAD and packed-corpus stage prepares with Accelerate; the order
depends only on (seed, epoch), so a resumed run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): every process draws the same one (accelerate then
    hands each its batches), and a resumed run sees exactly the order the interrupted run would have seen."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors (or arrays), fetched a whole batch at a time.

    ``__getitems__`` lets the DataLoader slice every column once per batch instead of collating per row.
    Integer columns are kept compact and widened to int64 per batch.
    """

    def __init__(self, columns: dict):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for name, col in self.columns.items():
            rows = torch.as_tensor(col[indices]) if not isinstance(col, torch.Tensor) else col[indices]
            out[name] = rows.long() if not rows.is_floating_point() else rows.float()
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ArrowColumn:
    """One column of a (memory-mapped) ``datasets.Dataset``, indexed like an array: ``column[rows]`` reads only
    those rows, as a numpy array. Training reads cached windows (kd.feature_cache) through it batch by batch
    instead of holding every window in memory."""

    def __init__(self, dataset, name: str):
        self.name = name
        self.dataset = dataset.select_columns([name]).with_format("numpy")
        first = self.dataset[:1][name] if len(dataset) else np.zeros((0,))
        self.shape = (len(dataset), *np.asarray(first).shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, np.ndarray):
            rows = rows.tolist()
        return np.asarray(self.dataset[rows][self.name])


def arrow_columns(dataset, names) -> dict:
    """name -> :class:`ArrowColumn` for each of ``names``."""
    return {name: ArrowColumn(dataset, name) for name in names}


def batch_is_ready(batch):
    """collate_fn for TensorDictDataset: ``__getitems__`` already returns the batch."""
    return batch


def make_train_dataloader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled by EpochSampler; pass it to accelerator.prepare; kd.loop.epoch_batches sets the epoch."""
    sampler = EpochSampler(len(dataset), seed)
    collate = batch_is_ready if hasattr(dataset, "__getitems__") else None
    # A private generator: creating an iterator draws a base seed from it, and drawing from the global RNG
    # instead would shift dropout masks after a resume (the resumed run creates one iterator more).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))
    return loader
