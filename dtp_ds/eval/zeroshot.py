"""Zero-shot classification: class names x prompt templates -> text classifier, then
top-1 / top-5 over a class-folder image set (or ImageNet's flat val with its devkit), split across
ranks. Images are decoded by the one rule (:func:`dtp_ds.data.decode.decode_image`); one that
cannot be is counted (``zeroshot_unusable``), not scored.

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters with
collectives, so ranks must not diverge); correct counts are summed across ranks.

Under ZeRO-3 a submodule's parameters are gathered by hooks around that submodule's
``forward``. ``encode_image`` / ``encode_text`` are not the CLIP module's forward, so the
parameters CLIP holds itself (``positional_embedding``, ``text_projection``, ...) would stay
partitioned (empty) there: they are gathered for the evaluation, and only they (small).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dtp_ds.data.decode import BadSample, decode_image
from dtp_ds.data.imagenet import ImageNetError, find_devkit, flat_images, labelled_flat_images, read_devkit
from dtp_ds.data.shards import DataError
from dtp_ds.data.synthetic import patch_labels, read_objects
from dtp_ds.eval.boundary_quality import BoundaryQuality
from dtp_ds.models import record_forward

log = logging.getLogger(__name__)


@dataclass
class ZeroShotSplit:
    name: str
    image_dir: str
    classnames: list[str]
    templates: list[Callable[[str], str]]
    objects: dict | None = None  # objects.json of a synthetic split: boundary purity is measured
    # (image, class index) where the images are not in class folders (ImageNet's flat val + devkit)
    samples: list[tuple[str, int]] | None = None


def imagenet_split(image_dir: str, devkit: str | None = None) -> ZeroShotSplit:
    """ImageNet-1k val with open_clip's class names and templates: the 1000 wnid folders, or the
    flat ``ILSVRC2012_val_*.JPEG`` files labelled by the devkit (``devkit``, else
    ``ILSVRC2012_devkit_t12[.tar.gz]`` found beside them; same images, same numbers)."""
    split = ZeroShotSplit("imagenet-val", image_dir, list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES))
    if not os.path.isdir(image_dir) or not flat_images(image_dir):
        return split  # class folders (check_split says when they are not)
    devkit = devkit or find_devkit(image_dir)
    if devkit is None:
        raise DataError(f"ImageNet val {image_dir}: flat ILSVRC2012_val_*.JPEG files and no devkit beside them: put "
                        f"ILSVRC2012_devkit_t12.tar.gz in {image_dir} or its parent, or sort them into wnid folders "
                        f"with tools/prepare_imagenet --val {image_dir} --devkit ILSVRC2012_devkit_t12.tar.gz "
                        f"--out DIR")
    try:
        split.samples = labelled_flat_images(image_dir, read_devkit(devkit))
    except ImageNetError as e:
        raise DataError(f"ImageNet val {image_dir}: {e}") from e
    return split


def folder_split(root: str) -> ZeroShotSplit:
    """A class-folder split with ``classnames.json`` (index order = sorted folder order)
    and ``templates.json`` (strings with ``{}``), as tools/make_synthetic_shards writes."""
    with open(os.path.join(root, "classnames.json")) as f:
        classnames = json.load(f)
    with open(os.path.join(root, "templates.json")) as f:
        templates = [(lambda c, t=t: t.format(c)) for t in json.load(f)]
    return ZeroShotSplit(os.path.basename(os.path.normpath(root)), root, classnames, templates, read_objects(root))


def check_split(split: ZeroShotSplit) -> None:
    if split.samples is not None:
        if not split.samples or max(label for _, label in split.samples) >= len(split.classnames):
            raise ValueError(f"{split.image_dir}: {len(split.samples)} labelled images, labels beyond the "
                             f"{len(split.classnames)} class names or none")
        return
    folders = sorted(d for d in os.listdir(split.image_dir) if os.path.isdir(os.path.join(split.image_dir, d)))
    if len(folders) != len(split.classnames):
        raise ValueError(f"{split.image_dir}: {len(folders)} class folders but {len(split.classnames)} class names")


@torch.no_grad()
def zero_shot_eval(
    model: nn.Module,
    tokenizer: Callable,
    preprocess: Callable,
    split: ZeroShotSplit,
    device: torch.device,
    input_dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    max_images: int | None = None,
    workers: int = 2,
    as_ranks: int | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (in %) of a CLIP model on ``split``; call on every rank. For
    models whose reducer groups patches (DRIP's segments) also the groups' quality as
    evaluation ran them
    (:mod:`dtp_ds.eval.boundary_quality`: ``zeroshot_compression``, ``..._purity`` where the
    split records its objects, ``..._prob_spread``). Images are decoded by ``workers`` loader
    processes (0: in this one), in order: the result does not depend on ``workers``.

    ``as_ranks`` (one process only): split the images as that many ranks would and run each
    rank's batches in turn, so the batches are those a run of that world size evaluated (its
    row is reproduced to the bit, not just to kernel rounding); the counts are the same either way."""
    if dist.is_initialized():
        if as_ranks not in (None, dist.get_world_size()):
            raise ValueError(f"as_ranks={as_ranks} under a process group of {dist.get_world_size()} ranks")
        ranks, world = [dist.get_rank()], dist.get_world_size()
    else:
        world = as_ranks or 1
        ranks = list(range(world))
    was_training = model.training
    model.eval()
    import deepspeed  # here: importing it prints to stdout, which tools that write JSON there must not

    # a no-op for parameters ZeRO-3 does not manage (every other stage)
    with deepspeed.zero.GatheredParameters(list(model.parameters(recurse=False))):
        classifier = build_zero_shot_classifier(model, tokenizer, split.classnames, split.templates,
                                                num_classes_per_batch=10, device=device, use_tqdm=False)
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, images, unusable images
        quality = BoundaryQuality(device)
        failures = [_evaluate(model, classifier, preprocess, split, device, input_dtype, batch_size, max_images,
                              rank, world, workers, stats, quality) for rank in ranks]
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(stats)
        dist.all_reduce(quality.sums)
    top1, top5, count, unusable = stats.tolist()
    if not count:  # (the same on every rank: the counts are all-reduced)
        raise DataError(f"evaluation split {split.name} ({split.image_dir}): no usable sample (it holds none, "
                        f"or --eval-max-images is 0)")
    result = {"zeroshot_top1": 100 * top1 / count, "zeroshot_top5": 100 * top5 / count,
              "zeroshot_images": int(count), "zeroshot_classes": len(split.classnames),
              "zeroshot_chance_top1": 100 / len(split.classnames)}
    if unusable:  # (only then: the rows of clean splits keep their keys)
        result["zeroshot_unusable"] = int(unusable)
        first = next((f for f in failures if f), "on another rank")
        log.warning("zero-shot %s: %d images could not be decoded and are not scored (first: %s)", split.name,
                    int(unusable), first)
    result.update(quality.result("zeroshot_"))
    return result


def _evaluate(model: nn.Module, classifier: torch.Tensor, preprocess: Callable, split: ZeroShotSplit,
              device: torch.device, input_dtype: torch.dtype, batch_size: int, max_images: int | None,
              rank: int, world: int, workers: int, stats: torch.Tensor, quality: BoundaryQuality) -> str | None:
    """Rank ``rank`` of ``world``'s share of the images: adds its top-1 / top-5 hits, scored and
    unusable images to ``stats`` and its groups to ``quality``; returns why its first unusable
    image was (None: none was)."""
    first_failure = None
    dataset = _Images(split_samples(split), preprocess)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    # Interleave so a capped evaluation still covers every class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    per_rank = math.ceil(n / world)
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    n_batches = math.ceil(per_rank / batch_size)
    batches = [mine[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
    loader = _image_loader(dataset, [idx or order[:1] for idx in batches], workers)
    for idx, (images, labels, why) in zip(batches, loader):
        real = len(idx)
        if real == 0:  # this rank ran out: a dummy batch (order[:1]) keeps the collectives in step
            idx = order[:1]
        images, labels = images.to(device=device, dtype=input_dtype), labels.to(device)
        with record_forward() as rec:
            feats = model.encode_image(images, normalize=True).float()
        logits = feats @ classifier.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        usable = labels >= 0  # (an image that could not be decoded is counted, not scored)
        hit = (top5 == labels[:, None]) & usable[:, None]
        if real:
            stats += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), usable.sum().item(),
                                   real - usable.sum().item()], dtype=torch.float64, device=device)
            first_failure = first_failure or next((w for w in why[:real] if w), None)
            for out in rec:  # the groups this forward's reducer made, if it groups patches
                if out.groups is not None:
                    quality.add(out.groups, out.scores,
                                [_patch_labels(split, dataset.samples[i][0], out.groups.shape[-1]) for i in idx],
                                images)
    return first_failure


def split_samples(split: ZeroShotSplit) -> list[tuple[str, int]]:
    """(image path, class index) of a split, in ``ImageFolder``'s order for class folders
    (torchvision's own listing, so indices and order are those of ``ImageFolder``)."""
    if split.samples is not None:
        return split.samples
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    return make_dataset(split.image_dir, find_classes(split.image_dir)[1], extensions=IMG_EXTENSIONS)


class _Images(Dataset):
    """(image, class index, "") through the one decoding rule (:func:`dtp_ds.data.decode.decode_image`);
    an image that cannot be decoded is (a white image, -1, why): counted as unusable, not scored.
    The transform runs outside the ``try``: an exception there is a bug and stops the evaluation."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[i]
        try:
            image = decode_image(path)
        except BadSample as e:
            return self.transform(Image.new("RGB", (32, 32), "white")), -1, f"{path}: {e}"
        return self.transform(image), label, ""


def _image_loader(dataset: Dataset, batches: list[list[int]], workers: int) -> DataLoader:
    """``dataset``'s ``batches`` decoded by ``workers`` processes, in order. Its own generator:
    starting a loader draws a seed, which must not come from the training run's RNG."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=torch.Generator(),
                      persistent_workers=False)


def with_prefix(result: dict[str, float], prefix: str) -> dict[str, float]:
    """``result``'s keys with ``zeroshot_`` replaced by ``prefix`` (a second split's row keys)."""
    return {prefix + k.removeprefix("zeroshot_"): v for k, v in result.items()}


def split_prefix(index: int, split: ZeroShotSplit) -> str:
    """The row keys' prefix of the ``index``-th split: ``zeroshot_`` for the first, ``NAME_`` after."""
    return "zeroshot_" if index == 0 else f"{split.name}_"


def describe(split: ZeroShotSplit, one: dict[str, float]) -> str:
    """One line for one split's :func:`zero_shot_eval` result (``zeroshot_*`` keys)."""
    line = (f"zero-shot {split.name}: top-1 {one['zeroshot_top1']:.2f}% top-5 {one['zeroshot_top5']:.2f}% "
            f"(chance {one['zeroshot_chance_top1']:.2f}%)")
    if "zeroshot_compression" in one:  # what the reducer reports: groups, scores (grouping has no scores)
        line += f", eval compression {one['zeroshot_compression']:.2f}"
        if "zeroshot_purity" in one:
            line += f", purity {one['zeroshot_purity']:.3f} (even {one.get('zeroshot_purity_even', 0):.3f})"
        if "zeroshot_prob_spread" in one:
            line += f", p spread {one['zeroshot_prob_spread']:.3f}"
    return line


def evaluate_splits(model: nn.Module, tokenizer: Callable, preprocess: Callable, splits: list[ZeroShotSplit],
                    device: torch.device, input_dtype: torch.dtype = torch.float32, batch_size: int = 64,
                    max_images: int | None = None, workers: int = 2, as_ranks: int | None = None
                    ) -> tuple[dict[str, float], list[str], list[dict[str, float]]]:
    """:func:`zero_shot_eval` on each split: the row (the first split's keys ``zeroshot_*``, the
    others' ``NAME_*``), one line per split, and each split's own result (``zeroshot_*`` keys).
    What training's periodic evaluation logs and ``tools/evaluate`` reports; call on every rank."""
    row: dict[str, float] = {}
    lines, results = [], []
    for i, split in enumerate(splits):
        one = zero_shot_eval(model, tokenizer, preprocess, split, device, input_dtype, batch_size=batch_size,
                             max_images=max_images, workers=workers, as_ranks=as_ranks)
        row.update(with_prefix(one, split_prefix(i, split)))
        lines.append(describe(split, one))
        results.append(one)
    return row, lines, results


def _patch_labels(split: ZeroShotSplit, path: str, num_patches: int):
    """Patch labels (on a shape or not) of one image of a split that records its objects."""
    if split.objects is None:
        return None
    objects = split.objects["objects"].get(os.path.relpath(path, split.image_dir).replace(os.sep, "/"))
    size, grid = split.objects["image_size"], math.isqrt(num_patches)
    if objects is None or grid * grid != num_patches or size % grid:
        return None  # unknown image, or the model sees another grid than the split was drawn on
    return patch_labels(objects, size, size // grid)
