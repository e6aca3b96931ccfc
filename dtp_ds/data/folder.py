"""Training from a class-folder tree (ImageNet's ``train/`` layout: ``ROOT/CLASS/IMAGE.jpg``,
class index = sorted folder order, as torchvision's ``ImageFolder``), under the same contract as
the shard loader (:func:`dtp_ds.data.shards.make_train_loader`): batches of (the tensors the
task's data stage makes, stacked; :class:`~dtp_ds.data.shards.BadCounts`), the epoch cut by
:func:`~dtp_ds.data.shards.plan_epoch`, its order a function of (seed, epoch) alone, so a
resumed run skips exactly the batches it trained and continues the same order; a sample's
augmentation is seeded by (seed, epoch, path) as a shard sample's is by its key.

A sample the data stage gets is ``{"cls": b"INDEX"}``, what a ``cls`` shard sample holds.
An image that cannot be read or decoded is counted (``decode_error``) and the next one takes
its place, so every batch is full; an exception of the data stage itself (augmentation) stops
the run (:mod:`dtp_ds.data.decode` decides what is bad data).
"""
from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dtp_ds.data.decode import BadSample, decode_image
from dtp_ds.data.shards import MAX_BAD_IN_A_ROW, Bad, BadCounts, DataConfig, DataError, EpochPlan


@dataclass
class ClassFolder:
    root: str
    classes: list[str]  # folder names in class-index order
    samples: list[tuple[str, int]]  # (image path, class index), ImageFolder's order


def class_folder(root: str) -> ClassFolder:
    """The images of a class-folder tree (torchvision's own listing, so the class indices are
    the ones an ``ImageFolder`` evaluation of the same layout uses)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, index = find_classes(root)
        samples = make_dataset(root, index, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"--train-data {root}: not a usable class-folder tree (ROOT/CLASS/IMAGE.jpg): {e}") from e
    return ClassFolder(root, classes, samples)


def epoch_order(num_images: int, num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's image indices: ``num_samples`` of them, whole shuffles of all images
    concatenated (the last cut short), drawn from (seed, epoch) only."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}-{epoch}".encode()))
    return torch.cat([torch.randperm(num_images, generator=g)
                      for _ in range(math.ceil(num_samples / num_images))])[:num_samples]


class _FolderImages(Dataset):
    """Image ``i`` through the task's data stage -> (tensors, skipped), the next image standing
    in for one that fails."""

    def __init__(self, folder: ClassFolder, stage: Callable, seed: int, epoch: int) -> None:
        self.folder, self.stage, self.prefix = folder, stage, f"{seed}-{epoch}-"

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, ...], list[Bad]]:
        bad: list[Bad] = []
        while len(bad) < MAX_BAD_IN_A_ROW:
            path, label = self.folder.samples[(i + len(bad)) % len(self.folder.samples)]
            key = os.path.relpath(path, self.folder.root)
            try:  # only the image's read and decode errors are bad data (dtp_ds.data.decode)
                image = decode_image(path)
            except BadSample as e:  # unreadable or corrupt image: counted, the next one is used
                bad.append(Bad("decode_error", self.folder.root, f"{key}: {e}"))
                continue
            # the task's own augmentation: an exception there is a bug and stops the run
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32((self.prefix + key).encode()))
                return self.stage(image, {"cls": str(label).encode()}), bad
        raise DataError(f"{len(bad)} images in a row under {self.folder.root} could not be used (last: "
                        f"{bad[-1].reason}); the training data is unusable")


def _collate(items: list[tuple[tuple[torch.Tensor, ...], list[Bad]]]) -> tuple[Any, ...]:
    counts = BadCounts()
    for _, bad in items:
        for b in bad:
            counts.add(b)
    return (*(torch.stack(column) for column in zip(*(t for t, _ in items))), counts)


def make_folder_loader(cfg: DataConfig, folder: ClassFolder, plan: EpochPlan, stage: Callable, micro_batch: int,
                       epoch: int, seed: int, rank: int, world_size: int, batches_done: int = 0) -> DataLoader:
    """The loader for one epoch of a class-folder tree: ``plan.batches_per_rank - batches_done``
    batches on this rank (rank r takes every world-th image of the epoch's order)."""
    mine = epoch_order(len(folder.samples), plan.num_samples, seed, epoch)[rank::world_size].tolist()
    batches = [mine[b * micro_batch:(b + 1) * micro_batch] for b in range(batches_done, plan.batches_per_rank)]
    # its own generator: starting the workers must not draw from the training run's RNG
    return DataLoader(_FolderImages(folder, stage, seed, epoch), batch_sampler=batches, num_workers=cfg.workers,
                      collate_fn=_collate, generator=torch.Generator(), persistent_workers=False)
