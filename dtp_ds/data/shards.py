"""WebDataset training pipeline for img2dataset-layout shards (``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

Built from open_clip_train's own stages (shard shuffling, resampling), with changes a
resumable cluster run needs:

* the sample shuffle is seeded by (seed, epoch, rank, worker), so an epoch's order is
  reproducible and ``--resume`` continues it exactly;
* resuming mid-epoch skips the already-trained samples *before* decoding them;
* nothing bad is silently dropped: a sample that cannot be decoded or lacks an image or a
  caption, a shard that cannot be opened (a directory, a FIFO, a failed download) and a
  truncated tar become :class:`Bad` markers in the stream, counted per kind (:data:`BAD_KINDS`)
  in a :class:`BadCounts` that travels with each batch, so the trainer can log them, warn once
  per shard and stop on too many. Samples lost with a broken shard are estimated from its
  ``*_stats.json``.

Local shards are opened with ``open()``, never through a shell; remote URLs go through
webdataset's openers, which hand http(s)/gs URLs to ``curl``/``gsutil`` through a shell, so
those URLs are refused when they carry shell metacharacters (``pipe:`` sources are shell
commands the user wrote on purpose and pass as given).

Shards on object storage are read the way open_clip documents, a ``pipe:`` command per shard
(``pipe:aws s3 cp s3://bucket/cc12m/{00000..01242}.tar -``). A remote shard's sample count
comes from its ``*_stats.json`` fetched the same way: the command (or URL) with the shard's
``NAME.tar`` replaced by ``NAME_stats.json`` (:func:`stats_url`), so no second configuration
is needed. The stats are fetched in parallel once per process and cached. Resuming is the same
for every source: the shard order and the skipped samples depend on the URLs and sample keys only.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from open_clip_train.data import ResampledShards2, SharedEpoch, detshuffle2, expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dtp_ds.data.decode import IMAGE_EXTS, BadSample, decode_sample

log = logging.getLogger(__name__)

_SHARD_SHUFFLE_SIZE = 2000
_SHARD_SHUFFLE_INITIAL = 500
_SAMPLE_SHUFFLE_SIZE = 5000
_SAMPLE_SHUFFLE_INITIAL = 1000

# What can be wrong with the data, as counted in metrics.jsonl (``bad_by_kind``):
# samples (the first four) and shard failures (the last two, one per failed read).
SAMPLE_KINDS = ("decode_error", "no_caption", "no_image")
BAD_KINDS = (*SAMPLE_KINDS, "lost_in_shards", "truncated_shards", "unreadable_shards")
# A worker that reads this many bad items in a row without one good sample gives up:
# the data is unusable (and an all-broken shard list would otherwise loop forever).
MAX_BAD_IN_A_ROW = 2000
# webdataset hands remote URLs to a shell inside single quotes ('URL'): a quote (or a
# control character) would end the quoting and run the rest as commands.
_SHELL_UNSAFE = re.compile(r"['\x00-\x1f\x7f]")
# A shard's name in a local path, URL or pipe: command: NAME.tar, then the end, a space, a quote or a query.
_TAR_NAME = re.compile(r"\.tar(?=$|[\s'\"?])")
STATS_TIMEOUT_S = 120  # one remote *_stats.json fetch (a pipe: command or a URL)
STATS_FETCHERS = 16  # remote stats fetched at once by count_samples


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


def check_url(url: str) -> None:
    """Refuse a remote shard URL that webdataset would splice into a shell command line
    with characters that escape its quoting (``pipe:`` sources are the user's own commands)."""
    if _is_local(url) or url.startswith("pipe:"):
        return
    if _SHELL_UNSAFE.search(url):
        raise DataError(f"shard URL {url!r} contains a quote or a control character: webdataset opens remote URLs "
                        f"through a shell (curl/gsutil, inside single quotes), so it is refused. Percent-encode it")


def split_shards(train_data: str) -> tuple[list[str], list[str]]:
    """(shards to read, local shards of the brace ranges that do not exist), in order."""
    urls, _ = expand_urls(train_data)
    for url in urls:
        check_url(url)
    missing = [u for u in urls if _is_local(u) and not os.path.exists(u)]
    gone = set(missing)
    return [u for u in urls if u not in gone], missing


def resolve_shards(train_data: str) -> tuple[list[str], list[str]]:
    """Expand brace ranges and ``::`` sources: (shards to read, local shards that do not
    exist). The missing ones are dropped with a warning naming them; no existing shard at
    all is an error."""
    present, missing = split_shards(train_data)
    if not present:
        urls = missing
        raise DataError(
            f"no shard matches --train-data '{train_data}' ({len(urls)} paths expanded, none exists; "
            f"first: {urls[0] if urls else '-'}). Check the directory and the brace range, "
            f"e.g. 'DIR/{{00000..00099}}.tar', or make data with tools/make_synthetic_shards."
        )
    if missing:
        named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        log.warning("%d of %d shards do not exist and are skipped: %s", len(missing), len(present) + len(missing),
                    named)
    return present, missing


def stats_url(shard: str) -> str | None:
    """Where a shard's img2dataset ``*_stats.json`` is, in the shard's own form: a local path, a
    URL, or a ``pipe:`` command with ``NAME.tar`` replaced by ``NAME_stats.json``. None when the
    shard's name is not one ``NAME.tar`` (there is no telling which to replace)."""
    if _is_local(shard):
        return os.path.splitext(shard)[0] + "_stats.json"
    found = list(_TAR_NAME.finditer(shard))
    if len(found) != 1:
        return None
    at = found[0].start()
    return shard[:at] + "_stats.json" + shard[found[0].end():]


def _stats_count(raw: bytes | str) -> int:
    """The sample count of an img2dataset stats file (``successes``; ``count`` for older ones)."""
    s = json.loads(raw)
    return int(s.get("successes", s.get("count", 0)))


def _fetch(url: str) -> bytes:
    """The bytes a remote source gives: a ``pipe:`` command's stdout (its stderr kept for the
    error, not the terminal), else webdataset's opener for the URL."""
    if url.startswith("pipe:"):
        # shell: the user's own pipe: command line, run as webdataset runs it for the shard itself
        r = subprocess.run(url[len("pipe:"):], shell=True, capture_output=True, timeout=STATS_TIMEOUT_S)
        if r.returncode != 0:
            raise OSError(f"exit status {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}")
        return r.stdout
    with wds.gopen(url) as f:
        return f.read()


@functools.cache
def _remote_shard_samples(shard: str) -> int | None:
    """A remote shard's count (cached: read_shard asks again after every pass over the shard)."""
    url = stats_url(shard)
    if url is None:
        log.debug("%s: no NAME.tar in it, so no *_stats.json to fetch", shard)
        return None
    try:
        return _stats_count(_fetch(url))
    except (OSError, ValueError, TypeError, AttributeError, subprocess.TimeoutExpired) as e:
        log.debug("%s: no sample count from %s: %s: %s", shard, url, type(e).__name__, e)
        return None


def shard_samples(shard: str) -> int | None:
    """Samples in one img2dataset shard, from its ``*_stats.json`` (None if unknown): beside a
    local shard, or fetched like a remote one (:func:`stats_url`)."""
    if not _is_local(shard):
        return _remote_shard_samples(shard)
    try:
        with open(stats_url(shard)) as f:
            return _stats_count(f.read())
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def count_samples(shards: list[str]) -> int | None:
    """Samples in img2dataset shards, from their ``*_stats.json`` (None if any lacks one; the
    first such is named in a warning). Remote stats are fetched in parallel."""
    remote = [s for s in shards if not _is_local(s)]
    if remote:
        with ThreadPoolExecutor(min(STATS_FETCHERS, len(remote))) as pool:
            list(pool.map(_remote_shard_samples, remote))  # fills the cache
    total = 0
    for shard in shards:
        n = shard_samples(shard)
        if n is None:
            log.warning("no sample count for shard %s (its *_stats.json, %s, cannot be read)", shard,
                        stats_url(shard) or "no NAME.tar in it to derive")
            return None
        total += n
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


@dataclass
class Bad:
    """A skipped item travelling down the pipeline in place of a sample."""

    kind: str  # one of BAD_KINDS
    shard: str
    reason: str
    samples: int = 1  # samples it stands for (lost_in_shards: the estimate, maybe 0)
    extra: dict[str, int] = field(default_factory=dict)  # further counts (a shard failure: {"lost_in_shards": n})


@dataclass
class BadCounts:
    """What a batch's worker skipped since its previous batch: counts per kind (see
    :data:`BAD_KINDS`) and, per shard, the first reason seen (for one warning per shard)."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, bad: Bad) -> None:
        self.counts[bad.kind] = self.counts.get(bad.kind, 0) + bad.samples
        for k, n in bad.extra.items():
            self.counts[k] = self.counts.get(k, 0) + n
        self.first.setdefault(bad.shard, f"{bad.kind}: {bad.reason}")

    @property
    def samples(self) -> int:
        """Samples lost (the shard-failure counts are events, not samples)."""
        return sum(self.counts.get(k, 0) for k in (*SAMPLE_KINDS, "lost_in_shards"))

    def __int__(self) -> int:
        return self.samples


def _open_shard(url: str) -> Any:
    """A binary stream of one shard: local files with ``open()`` (regular files only: a
    directory or a FIFO in a shard's place is refused, not waited on), others with
    webdataset's openers."""
    if _is_local(url):
        mode = os.stat(url).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({'directory' if stat.S_ISDIR(mode) else 'special file'})")
        return open(url, "rb")
    return wds.gopen(url)


def read_shard(url: str) -> Iterator[dict | Bad]:
    """Samples of one tar shard (grouped by key as open_clip_train does), then, if the read
    failed or came up short of the shard's ``*_stats.json`` count, one :class:`Bad` for it."""
    current: dict[str, Any] | None = None
    n, failure = 0, None
    try:
        stream = _open_shard(url)
    except (OSError, ValueError) as e:  # missing since resolution, unreadable, not a file, fetch failed
        # (webdataset's openers raise ValueError for a URL they cannot open)
        yield Bad("unreadable_shards", url, f"{type(e).__name__}: {e}", samples=1,
                  extra={"lost_in_shards": shard_samples(url) or 0})
        return
    try:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"] or suffix in current:
                if current is not None:
                    n += 1
                    yield current
                current = {"__key__": prefix, "__url__": url}
            current[suffix] = member["data"]
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:  # truncated or corrupt tar, failed pipe
        failure = f"{type(e).__name__}: {str(e).split(' @ ')[0]}"  # (what was read of the last sample still goes
        # on: if its image or caption is missing, decoding counts it)
    finally:
        try:
            stream.close()
        except OSError as e:  # a pipe: source that exited with an error (webdataset raises IOError)
            failure = failure or f"{type(e).__name__}: {e}"
    if current is not None:
        n += 1
        yield current
    expected = shard_samples(url)
    short = expected is not None and n < expected
    if failure or short:
        kind = "unreadable_shards" if failure and n == 0 else "truncated_shards"
        lost = max(0, (expected or 0) - n)
        why = failure or "ends early"
        yield Bad(kind, url, f"{why} after {n} samples" + (f" of {expected}" if expected is not None else ""),
                  samples=1, extra={"lost_in_shards": lost})


class _ReadShards(wds.PipelineStage):
    """Shard URLs (``{"url": ...}``) to samples, failures as :class:`Bad` markers (replaces
    open_clip_train's ``tarfile_to_samples_nothrow``, which logs and drops them uncounted)."""

    def run(self, src: Iterator[dict]) -> Iterator[dict | Bad]:
        for item in src:
            yield from read_shard(item["url"])


def _incomplete(sample: dict, keys: tuple[str, ...] = ("txt",)) -> str | None:
    """Why a grouped sample cannot be a training sample without decoding it (None: complete):
    ``no_image``, or ``no_KEY`` for the first of the task's ``keys`` it lacks."""
    if not any(e in sample for e in IMAGE_EXTS):
        return "no_image"
    for key in keys:
        if key not in sample:
            return "no_caption" if key == "txt" else f"no_{key}"
    return None


class _SkipTrained(wds.PipelineStage):
    """Drop the samples this worker already fed into trained batches (resume mid-epoch):
    original worker v produced ``batches_done // W + (v < batches_done % W)`` of them.
    The count is kept across the epoch's repeated passes, so it is skipped once.

    Only complete samples count toward that number; :class:`Bad` markers and incomplete
    samples met while skipping were counted before the checkpoint and are dropped here.
    (A sample whose image turns out undecodable is only found by decoding, so each one
    before the resume point shifts the resumed stream by one sample.)
    """

    def __init__(self, batches_done: int, batch_size: int, keys: tuple[str, ...] = ("txt",)):
        self.batches_done, self.batch_size, self.keys = batches_done, batch_size, keys
        self.remaining: int | None = None

    def run(self, src: Iterator[dict | Bad]) -> Iterator[dict | Bad]:
        if self.remaining is None:
            v, nw = _virtual_worker(self.batches_done)
            mine = self.batches_done // nw + (1 if v < self.batches_done % nw else 0)
            self.remaining = mine * self.batch_size
        for sample in src:
            if self.remaining > 0:
                if not isinstance(sample, Bad) and _incomplete(sample, self.keys) is None:
                    self.remaining -= 1
                continue
            yield sample


class _DecodeCounted(wds.PipelineStage):
    """Decode image + caption; a sample whose data fails to decode (:class:`BadSample`, see
    :mod:`dtp_ds.data.decode`) becomes a :class:`Bad` marker (counted downstream, warned about
    once per shard by the trainer). An exception of the data stage itself propagates.

    Augmentation draws from an RNG seeded by (seed, epoch, sample key), inside a forked RNG:
    a sample's crop is the same whichever worker decodes it and wherever the loader started,
    which is what makes a resumed run reproduce the straight one.
    """

    def __init__(self, stage: Callable, seed: int, epoch: int):
        self.stage = stage  # the task's data stage (dtp_ds.tasks.DataStage)
        self.seed_prefix = f"{seed}-{epoch}-"

    def run(self, src: Iterator[dict | Bad]) -> Iterator[tuple[torch.Tensor, ...] | Bad]:
        keys = tuple(getattr(self.stage, "keys", ("txt",)))
        for sample in src:
            if isinstance(sample, Bad):
                yield sample
                continue
            shard, key = sample.get("__url__", "?"), sample.get("__key__")
            missing = _incomplete(sample, keys)
            if missing is not None:
                what = {"no_image": "image", "no_caption": "caption"}.get(missing, missing[3:])
                yield Bad(missing if missing in BAD_KINDS else "decode_error", shard, f"sample {key} has no {what}")
                continue
            try:  # only the data's own read and decode errors are bad data (dtp_ds.data.decode)
                image, _ = decode_sample(sample, keys)
            except BadSample as e:  # corrupt JPEG, caption not utf-8, ...: the sample is lost, not the run
                yield Bad(e.kind if e.kind in BAD_KINDS else "decode_error", shard, f"sample {key}: {e}")
                continue
            # the task's own augmentation and tokenisation: an exception there is a bug and stops the run
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32((self.seed_prefix + str(key)).encode()))
                item = self.stage(image, sample)
            yield item


class _BatchCounted(wds.PipelineStage):
    """Collate decoded samples into (*tensors, BadCounts) where the counts are the
    items skipped since this worker's previous batch. Gives up (DataError) after
    ``MAX_BAD_IN_A_ROW`` bad items without a good sample.

    ``with_epoch`` runs the pipeline pass after pass through this one stage object: the bad
    items of a pass that ends mid-batch (and the run of bad ones) carry over to the next
    pass's first batch, so they are counted (and an all-bad pass cannot loop for ever)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.bad, self.in_a_row = BadCounts(), 0

    def run(self, src: Iterator[tuple | Bad]) -> Iterator[tuple[torch.Tensor | BadCounts, ...]]:
        items = []
        for item in src:
            if isinstance(item, Bad):
                self.bad.add(item)
                self.in_a_row += 1
                if self.in_a_row >= MAX_BAD_IN_A_ROW:
                    raise DataError(f"{self.in_a_row} bad items in a row and not one usable sample (last: "
                                    f"{item.shard}: {item.kind}: {item.reason}); the training data is unusable")
                continue
            self.in_a_row = 0
            items.append(item)
            if len(items) == self.batch_size:
                bad, self.bad = self.bad, BadCounts()
                yield (*(torch.stack(column) for column in zip(*items)), bad)
                items = []


def check_every_worker_has_a_shard(cfg: DataConfig, shards: list[str], world_size: int) -> None:
    """Without resampling each dataloader worker of each rank reads shards of its own."""
    workers = max(1, cfg.workers)
    if not cfg.dataset_resampled and len(shards) < workers * world_size:
        raise DataError(
            f"{len(shards)} shards for {world_size} ranks x {workers} workers: every worker needs a shard. "
            f"Use fewer --workers, more shards, or --dataset-resampled."
        )


def make_train_loader(
    cfg: DataConfig,
    shards: list[str],
    plan: EpochPlan,
    stage: Callable,
    micro_batch: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batches_done: int = 0,
) -> wds.WebLoader:
    """The loader for one epoch: yields ``plan.batches_per_rank - batches_done`` batches of
    (the tensors ``stage`` makes, stacked; :class:`BadCounts`) on this rank."""
    check_every_worker_has_a_shard(cfg, shards, world_size)
    shared_epoch = SharedEpoch(epoch=epoch)
    if cfg.dataset_resampled:
        # Seeded by (seed, rank, virtual worker), not by the dataloader's worker seeds (drawn
        # from the run's RNG at loader start): a resumed epoch resamples the same shards.
        def worker_seed() -> int:
            return hash((seed, rank, _virtual_worker(batches_done)[0])) % 2**31

        stages: list[Any] = [ResampledShards2(shards, worker_seed=worker_seed, deterministic=True, epoch=shared_epoch)]
    else:
        stages = [
            wds.SimpleShardList(shards),
            detshuffle2(bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=seed, epoch=shared_epoch),
            wds.split_by_node,
            _SplitByWorker(batches_done),
        ]
    stages += [
        _ReadShards(),
        _SeededShuffle(seed, epoch, rank, batches_done),
        _SkipTrained(batches_done, micro_batch, tuple(getattr(stage, "keys", ("txt",)))),
        _DecodeCounted(stage, seed, epoch),
        _BatchCounted(micro_batch),
    ]
    # Each worker loops over its shards as needed (with_epoch bounds it); the loader stops
    # after what is left of the rank's epoch, so every rank takes the same number of steps.
    dataset = wds.DataPipeline(*stages).with_epoch(plan.batches_per_worker)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.workers,
                           persistent_workers=False)
    return loader.slice(plan.batches_per_rank - batches_done)
