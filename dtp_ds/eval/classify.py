"""Classification evaluation: top-1 / top-5 (and the mean cross-entropy) of a classifier on a
validation split, which is either a class-folder tree (torchvision ``ImageFolder`` layout:
class index = sorted folder order, as ImageNet's val) or WebDataset shards whose samples carry
a ``cls`` key (an integer class index).

Images are split across ranks; the ranks step together (one tiny all-reduce per batch says
whether any rank still has images, a rank without any runs a dummy batch) because ZeRO-3
gathers parameters with collectives, so every rank must run the same number of forwards.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from torchvision.datasets import ImageFolder

from dtp_ds.data.decode import BadSample, decode_image, decode_sample
from dtp_ds.data.shards import Bad, DataError, read_shard, resolve_shards
from dtp_ds.data.synthetic import read_objects
from dtp_ds.eval.boundary_quality import BoundaryQuality
from dtp_ds.eval.zeroshot import _patch_labels
from dtp_ds.models import record_forward

UNUSABLE = -1  # the label of a validation sample that could not be read (counted, not scored)


@dataclass
class ClassSplit:
    """A validation split: a class-folder tree (``image_dir``) or ``cls`` shards (``shards``)."""

    name: str
    image_dir: str | None = None
    shards: list[str] | None = None
    num_classes: int | None = None  # the folder tree's class count (shards do not say)
    objects: dict | None = None  # objects.json of a synthetic folder split: boundary purity is measured


def folder_classes(root: str) -> list[str]:
    """The class folders of a class-folder tree, in index order (``ImageFolder``'s)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def class_split(path: str) -> ClassSplit:
    """A validation split from a class-folder directory or a shard spec ('DIR/{00000..00009}.tar')."""
    if os.path.isdir(path):
        classes = folder_classes(path)
        if not classes:
            raise ValueError(f"{path}: no class folders (ImageFolder layout: ROOT/CLASS/IMAGE.jpg)")
        return ClassSplit(os.path.basename(os.path.normpath(path)), image_dir=path, num_classes=len(classes),
                          objects=read_objects(path))
    shards, _ = resolve_shards(path)  # DataError naming the pattern when none exists
    return ClassSplit(os.path.basename(os.path.dirname(os.path.abspath(shards[0]))), shards=shards)


class _ShardImages(IterableDataset):
    """(image, label) of the ``cls`` shards' samples that fall to this rank and loader worker
    (sample i goes to slot ``i % (world * workers)``), the first ``max_images`` samples only."""

    def __init__(self, shards: list[str], transform: Callable, rank: int, world: int, max_images: int | None,
                 image_size: tuple[int, int]) -> None:
        self.shards, self.transform, self.rank, self.world = shards, transform, rank, world
        self.max_images, self.image_size = max_images, image_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * nw + wid, self.world * nw
        i = 0
        for shard in self.shards:
            for sample in read_shard(shard):
                if isinstance(sample, Bad):
                    continue  # a shard that cannot be read: its samples are not seen at all
                if self.max_images is not None and i >= self.max_images:
                    return
                i += 1
                if (i - 1) % slots == slot:
                    yield self._decode(sample)

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int, str]:
        """(image, label, "") or, for a sample whose data cannot be read (no image, no ``cls``,
        undecodable: :class:`BadSample`), (zeros, UNUSABLE, why). The transform runs outside:
        an exception there is a bug and stops the evaluation."""
        try:
            image, fields = decode_sample(sample, ("cls",))
        except BadSample as e:
            why = f"{sample.get('__url__')}: sample {sample.get('__key__')}: {e}"
            return torch.zeros(3, *self.image_size), UNUSABLE, why
        return self.transform(image), fields["cls"], ""


def _loader(split: ClassSplit, transform: Callable, rank: int, world: int, batch_size: int,
            max_images: int | None, workers: int, image_size: tuple[int, int]) -> tuple[DataLoader, list | None]:
    """This rank's batches of (images, labels[, why each unusable one is]), and for a folder split
    the image paths in order."""
    if split.shards is not None:
        data = _ShardImages(split.shards, transform, rank, world, max_images, image_size)
        return DataLoader(data, batch_size=batch_size, num_workers=workers, generator=torch.Generator()), None
    dataset = ImageFolder(split.image_dir, transform=transform, loader=decode_image)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    # interleaved (as the zero-shot evaluation): a capped evaluation still covers every class
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    mine = order[rank * math.ceil(n / world):(rank + 1) * math.ceil(n / world)]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers,
                        generator=torch.Generator())
    return loader, [dataset.samples[i][0] for i in mine]


@torch.no_grad()
def classify_eval(model: nn.Module, transform: Callable, split: ClassSplit, device: torch.device,
                  input_dtype: torch.dtype = torch.float32, batch_size: int = 64, max_images: int | None = None,
                  workers: int = 2, prefix: str = "val_") -> dict[str, float]:
    """``PREFIX``top1 / top5 (%), loss (mean cross-entropy), images, classes, chance_top1,
    unusable (samples that could not be read), and for reducers that group patches the groups'
    quality (``PREFIX``compression, ...); call on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    size = tuple(getattr(model, "img_size", (224, 224)))
    was_training = model.training
    model.eval()
    loader, paths = _loader(split, transform, rank, world, batch_size, max_images, workers, size)
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, images, loss sum, unusable
    quality = BoundaryQuality(device)
    batches, dummy, seen, first_failure = iter(loader), None, 0, None
    while True:
        batch = next(batches, None)
        more = torch.tensor([float(batch is not None)], device=device)
        if dist.is_initialized():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            break
        real = batch is not None
        if real and first_failure is None:  # a shard split's batches say why each unusable sample is
            first_failure = next((why for why in (batch[2] if len(batch) > 2 else []) if why), None)
        images, labels = batch[:2] if real else (dummy if dummy is not None else
                                                 (torch.zeros(1, 3, *size), torch.full((1,), UNUSABLE)))
        dummy = dummy or (images, torch.full_like(labels, UNUSABLE))
        images, labels = images.to(device=device, dtype=input_dtype), labels.to(device)
        with record_forward() as rec:
            logits = model(images).float()
        if not real:
            continue
        ok = labels != UNUSABLE
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = (top5 == labels[:, None]) & ok[:, None]
        loss = F.cross_entropy(logits[ok], labels[ok], reduction="sum") if ok.any() else logits.new_zeros(())
        stats += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), ok.sum(), loss, (~ok).sum()]).double()
        for out in rec:  # the groups this forward's reducer made, if it groups patches
            if out.groups is not None:
                names = paths[seen:seen + len(labels)] if paths is not None else [None] * len(labels)
                quality.add(out.groups, out.scores,
                            [None if p is None else _patch_labels(split, p, out.groups.shape[-1]) for p in names],
                            images)
        seen += len(labels)
    if dist.is_initialized():
        dist.all_reduce(stats)
        dist.all_reduce(quality.sums)
    model.train(was_training)
    top1, top5, count, loss, unusable = stats.tolist()
    if not count:  # (the same on every rank: the counts are all-reduced)
        where = split.image_dir or (os.path.dirname(split.shards[0]) if split.shards else split.name)
        cause = (f"{int(unusable)} samples read, none usable; the first failure: "
                 f"{first_failure or 'on another rank'}" if unusable else "it holds no sample")
        raise DataError(f"evaluation split {split.name} ({where}): no usable sample ({cause})")
    classes = getattr(model, "num_classes", None) or split.num_classes
    result = {f"{prefix}top1": 100 * top1 / max(count, 1), f"{prefix}top5": 100 * top5 / max(count, 1),
              f"{prefix}loss": loss / max(count, 1), f"{prefix}images": int(count),
              f"{prefix}classes": classes, f"{prefix}chance_top1": 100 / classes, f"{prefix}unusable": int(unusable)}
    result.update(quality.result(prefix))
    return result
