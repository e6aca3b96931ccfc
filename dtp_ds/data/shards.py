"""WebDataset training pipeline for img2dataset-layout shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

Built from open_clip_train's own stages (shard shuffling, resampling, tar reading), with
three changes a resumable cluster run needs:

* the sample shuffle is seeded by (seed, epoch, rank, worker), so an epoch's order is
  reproducible and ``--resume`` continues it exactly;
* resuming mid-epoch skips the already-trained samples *before* decoding them;
* samples that cannot be decoded (or lack an image or caption) are skipped and counted,
  the count travelling with each batch so the trainer can log it and stop on too many.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from open_clip_train.data import (
    ResampledShards2,
    SharedEpoch,
    detshuffle2,
    expand_urls,
    tarfile_to_samples_nothrow,
)
from PIL import Image

log = logging.getLogger(__name__)

_SHARD_SHUFFLE_SIZE = 2000
_SHARD_SHUFFLE_INITIAL = 500
_SAMPLE_SHUFFLE_SIZE = 5000
_SAMPLE_SHUFFLE_INITIAL = 1000
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DataConfig:
    train_data: str | None = None
    train_num_samples: int | None = None
    dataset_resampled: bool = False
    workers: int = 2
    max_bad_fraction: float = 0.05


class DataError(ValueError):
    """The training data cannot be used as given; the message names the fix."""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(train_data: str) -> list[str]:
    """Expand brace ranges and ``::`` sources; local shards that do not exist are dropped
    (with a warning naming them); no existing shard at all is an error."""
    urls, _ = expand_urls(train_data)
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not os.path.exists(u)]
    if len(missing) == len(urls):
        raise DataError(
            f"no shard matches --train-data '{train_data}' ({len(urls)} paths expanded, none exists; "
            f"first: {urls[0] if urls else '-'}). Check the directory and the brace range, "
            f"e.g. 'DIR/{{00000..00099}}.tar', or make data with tools/make_synthetic_shards."
        )
    if missing:
        log.warning("%d of %d shards do not exist and are skipped (first: %s)", len(missing), len(urls), missing[0])
    return [u for u in urls if u not in set(missing)]


def count_samples(shards: list[str]) -> int | None:
    """Samples in local img2dataset shards, from their ``*_stats.json`` (None if any lacks one)."""
    total = 0
    for shard in shards:
        if not _is_local(shard):
            return None
        stats = os.path.splitext(shard)[0] + "_stats.json"
        if not os.path.exists(stats):
            return None
        with open(stats) as f:
            s = json.load(f)
        total += int(s.get("successes", s.get("count", 0)))
    return total


@dataclass
class EpochPlan:
    """How one epoch is cut into micro-batches (the same on every rank)."""

    num_samples: int  # samples per epoch over all ranks, after rounding to whole batches
    batches_per_rank: int  # micro-batches each rank sees per epoch
    batches_per_worker: int


def plan_epoch(num_samples: int, micro_batch: int, world_size: int, workers: int, accum: int) -> EpochPlan:
    """Round the epoch up to whole optimizer steps that every worker shares equally
    (open_clip rounds up the same way): micro-batches per rank are a multiple of both
    the worker count and the accumulation steps."""
    w = max(1, workers)
    unit = math.lcm(w, accum)
    per_rank = math.ceil(num_samples / (micro_batch * world_size * unit)) * unit
    return EpochPlan(per_rank * micro_batch * world_size, per_rank, per_rank // w)


def _virtual_worker(batches_done: int) -> tuple[int, int]:
    """(worker id, workers) as the epoch's *first* loader numbered them.

    The DataLoader hands out batches round-robin from worker 0, so after ``batches_done``
    batches the next one comes from worker ``batches_done % W``. A loader rebuilt on
    resume starts at its worker 0 again, so its worker w plays the original worker
    ``(w + batches_done) % W``: the batch order continues exactly.
    """
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return (wid + batches_done) % nw, nw


class _SplitByWorker(wds.PipelineStage):
    """wds.split_by_worker on the virtual worker id (see ``_virtual_worker``)."""

    def __init__(self, batches_done: int):
        self.batches_done = batches_done

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        wid, nw = _virtual_worker(self.batches_done)
        for i, item in enumerate(src):
            if i % nw == wid:
                yield item


class _SeededShuffle(wds.PipelineStage):
    """Sample shuffle with an RNG derived from (seed, epoch, rank, worker): reproducible."""

    def __init__(self, seed: int, epoch: int, rank: int, batches_done: int):
        self.key, self.batches_done = (seed, epoch, rank), batches_done

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(hash(self.key + (_virtual_worker(self.batches_done)[0],)))
        return wds.filters._shuffle(src, _SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, rng=rng)


class _SkipTrained(wds.PipelineStage):
    """Drop the samples this worker already fed into trained batches (resume mid-epoch):
    original worker v produced ``batches_done // W + (v < batches_done % W)`` of them.
    The count is kept across the epoch's repeated passes, so it is skipped once.
    """

    def __init__(self, batches_done: int, batch_size: int):
        self.batches_done, self.batch_size = batches_done, batch_size
        self.remaining: int | None = None

    def run(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.remaining is None:
            v, nw = _virtual_worker(self.batches_done)
            mine = self.batches_done // nw + (1 if v < self.batches_done % nw else 0)
            self.remaining = mine * self.batch_size
        for sample in src:
            if self.remaining > 0:
                self.remaining -= 1
                continue
            yield sample


class _DecodeCounted(wds.PipelineStage):
    """Decode image + caption; a sample that fails becomes a ``None`` marker (counted
    downstream) and is warned about once per shard.

    Augmentation draws from an RNG seeded by (seed, epoch, sample key), inside a forked RNG:
    a sample's crop is the same whichever worker decodes it and wherever the loader started,
    which is what makes a resumed run reproduce the straight one.
    """

    def __init__(self, preprocess: Callable, tokenizer: Callable, seed: int, epoch: int):
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.seed_prefix = f"{seed}-{epoch}-"
        self.warned: set[str] = set()

    def _warn(self, sample: dict, why: str) -> None:
        shard = sample.get("__url__", "?")
        if shard not in self.warned:
            self.warned.add(shard)
            log.warning("skipping undecodable sample %s in %s (%s); further ones in this shard are only counted",
                        sample.get("__key__"), shard, why)

    def run(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        for sample in src:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None or "txt" not in sample:
                self._warn(sample, "no image" if ext is None else "no caption")
                yield None
                continue
            try:
                with Image.open(io.BytesIO(sample[ext])) as im, torch.random.fork_rng(devices=[]):
                    torch.manual_seed(zlib.crc32((self.seed_prefix + str(sample.get("__key__"))).encode()))
                    image = self.preprocess(im.convert("RGB"))
                caption = sample["txt"].decode("utf-8")
                text = self.tokenizer(caption)[0]
            except Exception as e:  # corrupt JPEG, bad utf-8, ...: the sample is lost, not the run
                self._warn(sample, f"{type(e).__name__}: {e}")
                yield None
                continue
            yield image, text


class _BatchCounted(wds.PipelineStage):
    """Collate decoded samples into (images, texts, n_bad) where n_bad counts the samples
    skipped since this worker's previous batch."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def run(self, src: Iterator[tuple | None]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        images, texts, bad = [], [], 0
        for item in src:
            if item is None:
                bad += 1
                continue
            images.append(item[0])
            texts.append(item[1])
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.stack(texts), bad
                images, texts, bad = [], [], 0


def make_train_loader(
    cfg: DataConfig,
    shards: list[str],
    plan: EpochPlan,
    preprocess: Callable,
    tokenizer: Callable,
    micro_batch: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batches_done: int = 0,
) -> wds.WebLoader:
    """The loader for one epoch: yields ``plan.batches_per_rank - batches_done`` batches of
    (images, tokens, n_bad) on this rank."""
    workers = max(1, cfg.workers)
    if not cfg.dataset_resampled and len(shards) < workers * world_size:
        raise DataError(
            f"{len(shards)} shards for {world_size} ranks x {workers} workers: every worker needs a shard. "
            f"Use fewer --workers, more shards, or --dataset-resampled."
        )
    shared_epoch = SharedEpoch(epoch=epoch)
    if cfg.dataset_resampled:
        stages: list[Any] = [ResampledShards2(shards, deterministic=True, epoch=shared_epoch)]
    else:
        stages = [
            wds.SimpleShardList(shards),
            detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=seed, epoch=shared_epoch),
            wds.split_by_node,
            _SplitByWorker(batches_done),
        ]
    stages += [
        tarfile_to_samples_nothrow,
        _SeededShuffle(seed, epoch, rank, batches_done),
        _SkipTrained(batches_done, micro_batch),
        _DecodeCounted(preprocess, tokenizer, seed, epoch),
        _BatchCounted(micro_batch),
    ]
    # Each worker loops over its shards as needed (with_epoch bounds it); the loader stops
    # after what is left of the rank's epoch, so every rank takes the same number of steps.
    dataset = wds.DataPipeline(*stages).with_epoch(plan.batches_per_worker)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.workers,
                           persistent_workers=False)
    return loader.slice(plan.batches_per_rank - batches_done)


