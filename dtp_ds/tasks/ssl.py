"""What the augmentation-invariance tasks (``mocov3``, ``simclr``, ``dino``) share: the image
trunk they pretrain (any registered model's, reducer included; exported alone), their data
(any images: class-folder trees or shards, labels unused in training) and their evaluation,
a weighted kNN classifier (DINO's: k = 20, T = 0.07) of ``--val-data`` against a bank of
labelled training images (``--knn-bank``, default: ``--train-data`` when it is a class-folder
tree). Not a task itself: each task is its own file.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import open_clip
import torch
from torch import nn

from dtp_ds.data.shards import DataError
from dtp_ds.data.views import MultiView, ViewStage
from dtp_ds.eval.classify import ClassSplit, class_split
from dtp_ds.eval.knn import knn_eval
from dtp_ds.eval.linear_probe import eval_transform
from dtp_ds.models import vision_tower

from . import SplitsContext, TaskBase, TaskSpec

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD  # what CLIP feeds the same trunks


@dataclass
class KnnConfig:
    """The kNN evaluation's settings (every SSL task's Config extends it)."""

    val_data: list[str] | None = None  # class-folder dirs or cls shards: kNN-classified every --eval-frequency
    knn_bank: str | None = None  # labelled training images; None: --train-data if it is a class-folder tree
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank_max_images: int | None = None


def add_knn_flags(add: Callable[..., Any]) -> None:
    add("--val-data", nargs="+", metavar="DIR|SHARDS",
        help="validation splits: class-folder trees or shards with a cls key; classify / kNN evaluation every "
             "--eval-frequency epochs and at the end, the first logged with the task's plain keys (val_*, knn_*), "
             "others as NAME_*")
    add("--knn-bank", metavar="DIR|SHARDS",
        help="kNN: the labelled training images the validation images are compared with (default: --train-data "
             "when it is a class-folder tree)")
    add("--knn-k", type=int, help="kNN: neighbours that vote (default 20)")
    add("--knn-temperature", type=float, help="kNN: votes weigh exp(cosine / T) (default 0.07)")
    add("--knn-bank-max-images", type=int, help="kNN: the first N bank images (default all)")


def check_knn(cfg: KnnConfig) -> None:
    if cfg.knn_k < 1 or not cfg.knn_temperature > 0:
        raise ValueError(f"--knn-k {cfg.knn_k} / --knn-temperature {cfg.knn_temperature}: need k >= 1 and T > 0")


@dataclass
class KnnSplit:
    """One validation split and the bank its images are classified against."""

    name: str
    bank: ClassSplit
    query: ClassSplit


def knn_splits(cfg: KnnConfig, ctx: SplitsContext) -> tuple[list[KnnSplit], list[dict[str, Any]]]:
    """The kNN splits (``--val-data`` against ``--knn-bank``); the bank taken from a class-folder
    ``--train-data`` is recorded as an override."""
    if not cfg.val_data:
        return [], []
    overrides = []
    bank_path = cfg.knn_bank
    if bank_path is None:
        if not (ctx.train_data and os.path.isdir(ctx.train_data)):
            raise ValueError("--val-data: the kNN evaluation needs labelled training images: give --knn-bank "
                             "(a class-folder tree or cls shards of the training split)")
        bank_path = cfg.knn_bank = ctx.train_data
        overrides.append({"key": "knn_bank", "flag": "--knn-bank", "value": bank_path,
                          "why": "--train-data is a class-folder tree"})
    try:
        bank = class_split(bank_path)
        queries = [class_split(p) for p in cfg.val_data]
    except (ValueError, DataError) as e:
        raise ValueError(f"--val-data / --knn-bank: {e}") from e
    return [KnnSplit(q.name, bank, q) for q in queries], overrides


class SSLTask(TaskBase):
    """The shared part of an augmentation-invariance task: the trunk (``self.model``, no head:
    its pooled features), the views, the kNN evaluation, the export. A subclass builds
    ``self.module`` (the trunk, its heads, a teacher if any, the loss) and its schedules."""

    Config: ClassVar[type] = KnnConfig
    train_layouts: ClassVar[frozenset[str]] = frozenset({"shards", "folder"})
    couples_batch = True  # contrastive negatives, BatchNorm and DINO's centre all see the whole batch

    @classmethod
    def check(cls, cfg: KnnConfig) -> None:
        check_knn(cfg)

    @classmethod
    def eval_splits(cls, cfg: KnnConfig, ctx: SplitsContext) -> tuple[list[KnnSplit], list[dict[str, Any]]]:
        return knn_splits(cfg, ctx)

    @classmethod
    def build_model(cls, model: str, client_state: dict[str, Any]) -> nn.Module:
        return vision_tower(model, 0)  # the trunk's pooled features (num_classes 0: no head)

    def __init__(self, spec: TaskSpec) -> None:
        self.cfg = spec.config
        self.model = self.build_model(spec.model, {})
        self.input_dtype = spec.input_dtype
        self.size = int(self.model.img_size[0])
        self.patch = int(self.model.patch_size)
        self.eval_preprocess = eval_transform(self.model)

    def views(self) -> MultiView:
        raise NotImplementedError

    @functools.cached_property
    def batch_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.views().names  # view1, view2 (, local)

    def data_stage(self) -> ViewStage:
        return ViewStage(self.views())

    def evaluate(self, splits: Iterable[KnnSplit], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int = 2) -> tuple[dict[str, float], list[str]]:
        """kNN top-1 / top-5 per split: the first split's keys ``knn_*``, the others' ``NAME_knn_*``."""
        row: dict[str, float] = {}
        lines = []
        for i, split in enumerate(splits):
            prefix = "knn_" if i == 0 else f"{split.name}_knn_"
            one = knn_eval(self.model, self.eval_preprocess, split.bank, split.query, device, self.input_dtype,
                           batch_size, max_images, workers, self.cfg.knn_k, self.cfg.knn_temperature,
                           self.cfg.knn_bank_max_images, prefix)
            row.update(one)
            lines.append(f"knn {split.name}: top-1 {one[prefix + 'top1']:.2f}% top-5 {one[prefix + 'top5']:.2f}% "
                         f"(chance {one[prefix + 'chance_top1']:.2f}%; k {self.cfg.knn_k}, bank of "
                         f"{one[prefix + 'bank']})")
        return row, lines
