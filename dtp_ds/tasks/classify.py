"""Supervised classification (``--task classify``): the model config's image trunk alone (any
reducer; no text tower) with a ``num_classes``-wide head, trained with cross-entropy (label
smoothing, or timm's Mixup / CutMix soft targets) plus the reducer's auxiliary losses (DRIP's
boundary loss); class-labelled data (``cls`` shards or a class-folder tree) through timm's
``create_transform`` (RandAugment, random erasing); top-1 / top-5 on validation splits.

The head is the trunk's own: its final LayerNorm, its pooling (the config's ``trunk_cfg`` pool;
an open_clip ViT config's class token) and its bias-free linear layer, ``num_classes`` wide
(:func:`dtp_ds.models.vision_tower`).
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from dtp_ds.data.shards import DataError
from dtp_ds.eval.classify import ClassSplit, class_split, classify_eval
from dtp_ds.models import record_forward, vision_tower

from . import SplitsContext, TaskBase, TaskSpec, reducer_terms, register_task


@dataclass
class ClassifyConfig:
    """``--task classify``'s settings (flags named as timm's ``train.py``'s)."""

    num_classes: int | None = None  # None: the class folders of --train-data, else of the first --val-data
    val_data: list[str] | None = None  # class-folder dirs or cls shard specs; the first is logged as val_*
    drop_path: float | None = None  # stochastic depth (the last block's rate); None: the config's trunk_cfg
    aa: str | None = None  # timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    reprob: float = 0.0  # random erasing probability
    color_jitter: float = 0.4  # (timm turns it off when --aa is set)
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_pct: float = 0.875  # evaluation: resize to size / crop_pct, centre crop
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@contextlib.contextmanager
def host_rngs_seeded(seed: int) -> Iterator[None]:
    """Python's and numpy's RNGs seeded by ``seed`` inside, restored after: timm's RandAugment
    and random erasing draw from them, and the loader seeds only torch's per sample."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class LabelStage:
    """A labelled sample (``cls``: the class index as text) -> (augmented image, label)."""

    keys = ("cls",)

    def __init__(self, transform, num_classes: int) -> None:
        self.transform, self.num_classes = transform, num_classes

    def __call__(self, image: Any, sample: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"cls {label} is outside [0, {self.num_classes}) (--num-classes)")
        with host_rngs_seeded(torch.initial_seed()):  # the loader's per-sample torch seed
            return self.transform(image), torch.tensor(label)


class ClassifyModule(nn.Module):
    """Classifier + cross-entropy (+ the trunk's auxiliary losses, each weighted by
    ``aux_loss_weight``): ``{"image": ..., "label": ...}`` -> ``{"loss": ..., ...}``. In training
    a ``mixup`` (timm's) mixes each batch and gives soft targets (smoothing included)."""

    def __init__(self, model: nn.Module, smoothing: float = 0.0, mixup: Mixup | None = None,
                 aux_loss_weight: float = 1.0, input_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model, self.smoothing, self.mixup = model, smoothing, mixup
        self.aux_loss_weight, self.input_dtype = aux_loss_weight, input_dtype

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): mixed images and (B, classes) soft targets under mixup in
        training, else the images and the class indices."""
        if self.training and self.mixup is not None:
            return self.mixup(images.float(), labels)
        return images, labels

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = self.targets(batch["image"], batch["label"])
        with record_forward() as records:
            logits = self.model(images.to(self.input_dtype)).float()  # the loss in fp32
        if targets.dim() == 2:
            ce = SoftTargetCrossEntropy()(logits, targets)
        else:
            ce = F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        result = {"ce_loss": ce}
        aux, row = reducer_terms(records, self.aux_loss_weight)
        result.update(row)
        result["loss"] = ce if aux is None else ce + aux
        return result


def transforms(model: nn.Module, cfg: ClassifyConfig) -> tuple[Any, Any]:
    """(train, eval) image transforms: timm's ``create_transform`` at the trunk's input size,
    with CLIP's mean / std (what the CLIP task feeds the same trunks)."""
    size = tuple(model.img_size)
    common = {"input_size": (3, *size), "interpolation": "bicubic", "mean": open_clip.OPENAI_DATASET_MEAN,
              "std": open_clip.OPENAI_DATASET_STD}
    train = create_transform(**common, is_training=True, scale=tuple(cfg.scale), auto_augment=cfg.aa,
                             re_prob=cfg.reprob, color_jitter=cfg.color_jitter)
    val = create_transform(**common, is_training=False, crop_pct=cfg.crop_pct)
    return train, val


def make_mixup(cfg: ClassifyConfig, num_classes: int) -> Mixup | None:
    if not cfg.mixes:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def check_config(c: ClassifyConfig) -> None:
    if c.num_classes is not None and c.num_classes < 2:
        raise ValueError(f"--num-classes {c.num_classes}: must be >= 2")
    if not 0.0 <= c.smoothing < 1.0:
        raise ValueError(f"--smoothing {c.smoothing}: must be in [0, 1)")
    if not 0.0 < c.scale[0] <= c.scale[1] <= 1.0:
        raise ValueError(f"--scale {c.scale[0]} {c.scale[1]}: need 0 < MIN <= MAX <= 1")
    if c.mixup < 0 or c.cutmix < 0 or not 0 <= c.mixup_prob <= 1 or not 0 <= c.mixup_switch_prob <= 1:
        raise ValueError("--mixup and --cutmix must be >= 0, --mixup-prob and --mixup-switch-prob in [0, 1]")
    if not 0.0 <= c.reprob <= 1.0 or not 0.0 < c.crop_pct <= 1.0:
        raise ValueError("--reprob must be in [0, 1], --crop-pct in (0, 1]")
    if c.drop_path is not None and not 0.0 <= c.drop_path < 1.0:
        raise ValueError(f"--drop-path {c.drop_path}: must be in [0, 1)")


def classify_splits(c: ClassifyConfig, ctx: SplitsContext) -> tuple[list[ClassSplit], list[dict[str, Any]]]:
    """The validation splits (--val-data); settles --num-classes (from the class folders of
    --train-data, else of the first folder split: recorded as an override)."""
    overrides = []
    try:
        splits = [class_split(p) for p in c.val_data or []]
    except (ValueError, DataError) as e:
        raise ValueError(f"--val-data: {e}") from e
    if c.num_classes is None:
        found = [(f"the {ctx.train_classes} class folders of --train-data", ctx.train_classes)] \
            if ctx.train_classes else []
        found += [(f"the {s.num_classes} class folders of --val-data {s.image_dir}", s.num_classes)
                  for s in splits if s.num_classes]
        if not found:
            raise ValueError("--task classify on cls shards: give --num-classes (shards do not say how many "
                             "classes there are; a class-folder --val-data would)")
        why, c.num_classes = found[0]
        overrides.append({"key": "num_classes", "flag": "--num-classes", "value": c.num_classes, "why": why})
    named = ([("--train-data", ctx.train_classes)] if ctx.train_classes else []) + [
        (f"--val-data {s.image_dir}", s.num_classes) for s in splits if s.num_classes]
    for where, n in named:
        if n > c.num_classes:
            raise ValueError(f"{where} has {n} class folders but --num-classes is {c.num_classes}")
    if c.mixes and ctx.micro_batch % 2:
        raise ValueError(f"--mixup / --cutmix mix each batch with its reverse: the micro-batch ({ctx.micro_batch}) "
                         f"must be even")
    return splits, overrides


@register_task("classify")
class ClassifyTask(TaskBase):
    """``--task classify``: the trunk as a classifier on class-labelled shards or a class-folder
    tree, evaluated top-1 / top-5."""

    Config = ClassifyConfig
    train_layouts: ClassVar[frozenset[str]] = frozenset({"shards", "folder"})
    couples_batch = False  # per-sample cross-entropy (mixup pairs within a micro-batch): accumulation is exact
    batch_keys = ("image", "label")

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        add("--num-classes", type=int,
            help="classifier width (default: the class folders of --train-data, else of the first --val-data folder)")
        add("--val-data", nargs="+", metavar="DIR|SHARDS",
            help="validation splits: class-folder trees (ImageFolder layout) or shards with a cls key, evaluated "
                 "every --eval-frequency epochs and at the end by the task (classify: top-1 / top-5 as val_*; "
                 "mocov3, simclr, dino: kNN as knn_*), the first split under those keys, others as NAME_*")
        add("--drop-path", type=float,
            help="stochastic depth rate (default: the model config's trunk_cfg drop_path_rate)")
        add("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment; default: none)")
        add("--reprob", type=float, help="random erasing probability (default 0)")
        add("--color-jitter", type=float, help="colour jitter strength (default 0.4; off under --aa)")
        add("--scale", type=float, nargs=2, metavar=("MIN", "MAX"),
            help="random-resized-crop area range (default 0.08 1)")
        add("--crop-pct", type=float, help="evaluation centre crop: resize to size / crop-pct, crop (default 0.875)")
        add("--smoothing", type=float, help="label smoothing (default 0.1)")
        add("--mixup", type=float, help="mixup alpha (default 0: off)")
        add("--cutmix", type=float, help="cutmix alpha (default 0: off)")
        add("--mixup-prob", type=float, help="probability of mixing a batch (default 1)")
        add("--mixup-switch-prob", type=float,
            help="probability of cutmix instead of mixup when both are on (default 0.5)")

    @classmethod
    def check(cls, cfg: ClassifyConfig) -> None:
        check_config(cfg)

    @classmethod
    def eval_splits(cls, cfg: ClassifyConfig, ctx: SplitsContext) -> tuple[list[ClassSplit], list[dict[str, Any]]]:
        return classify_splits(cfg, ctx)

    @classmethod
    def build_model(cls, model: str, client_state: dict[str, Any]) -> nn.Module:
        return vision_tower(model, int(client_state["num_classes"]))

    def __init__(self, spec: TaskSpec) -> None:
        self.cfg: ClassifyConfig = spec.config
        if not self.cfg.num_classes:
            raise ValueError("--task classify needs the number of classes (--num-classes)")
        overrides = {} if self.cfg.drop_path is None else {"drop_path_rate": self.cfg.drop_path}
        self.model = vision_tower(spec.model, self.cfg.num_classes, **overrides)
        self.preprocess_train, self.preprocess_val = transforms(self.model, self.cfg)
        self.input_dtype = spec.input_dtype
        self.module = ClassifyModule(self.model, self.cfg.smoothing, make_mixup(self.cfg, self.cfg.num_classes),
                                     spec.aux_loss_weight, spec.input_dtype)

    def data_stage(self) -> LabelStage:
        return LabelStage(self.preprocess_train, self.cfg.num_classes)

    def client_state(self) -> dict[str, Any]:
        return {"num_classes": self.cfg.num_classes}

    def evaluate(self, splits: Iterable[ClassSplit], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int = 2) -> tuple[dict[str, float], list[str]]:
        """Top-1 / top-5 per split: the first split's keys ``val_*``, the others' ``NAME_*``."""
        res: dict[str, float] = {}
        lines = []
        for i, split in enumerate(splits):
            prefix = "val_" if i == 0 else f"{split.name}_"
            one = classify_eval(self.model, self.preprocess_val, split, device, self.input_dtype, batch_size,
                                max_images, workers, prefix)
            res.update(one)
            line = (f"classify {split.name}: top-1 {one[prefix + 'top1']:.2f}% top-5 {one[prefix + 'top5']:.2f}% "
                    f"(chance {one[prefix + 'chance_top1']:.2f}%), loss {one[prefix + 'loss']:.3f}")
            if prefix + "compression" in one:
                line += f", eval compression {one[prefix + 'compression']:.2f}"
            if one[prefix + "unusable"]:
                line += f", {one[prefix + 'unusable']} unusable samples"
            lines.append(line)
        return res, lines
