"""CLIP: an open_clip model (any image trunk) + the contrastive loss + the reducer's auxiliary
losses; captioned image shards; zero-shot evaluation.

Cross-rank work (gathering features for the contrastive loss) lives in open_clip's
``ClipLoss``; the model stays single-device code.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import nn

from dtp_ds.eval.zeroshot import ZeroShotSplit, check_split, evaluate_splits, folder_split, imagenet_split
from dtp_ds.models import record_forward

from . import SplitsContext, TaskBase, TaskSpec, reducer_terms, register_task

# open_clip clamps the learned temperature at 100 after every step (clamp_ on the
# parameter); clamping the value in the forward does the same without touching a
# parameter that ZeRO-3 may have partitioned away.
MAX_LOGIT_SCALE = 100.0


@dataclass
class CLIPConfig:
    """``--task clip``'s settings."""

    local_loss: bool = False  # contrastive logits local x global (open_clip's --local-loss)
    gather_with_grad: bool = False
    zeroshot_data: str | None = None  # class-folder dir with classnames.json / templates.json
    zeroshot_extra: list[str] | None = None  # more such splits, logged as NAME_top1, ...
    imagenet_val: str | None = None  # ImageNet-1k val in class-folder layout


class CLIPModule(nn.Module):
    """CLIP model + contrastive loss (+ the image trunk's auxiliary losses, each weighted by
    ``aux_loss_weight``): ``{"image": ..., "text": ...}`` -> ``{"loss": ..., ...}``.

    A :class:`~dtp_ds.tasks.SplitLoss`: ``forward(batch, encode=True)`` gives the features the
    contrastive loss compares (``batched``), the logit scale (``shared``), the auxiliary losses
    (``own_loss``, means over the batch's samples) and the row statistics; ``coupled_loss`` is
    the contrastive loss over features of any batch (GradCache's whole step)."""

    def __init__(self, model: nn.Module, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                 gather_with_grad: bool = False, aux_loss_weight: float = 1.0,
                 input_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=rank, world_size=world_size)
        self.aux_loss_weight = aux_loss_weight
        self.input_dtype = input_dtype  # DeepSpeed's bf16/fp16 modes cast the weights, not the inputs

    def forward(self, batch: dict[str, torch.Tensor], encode: bool = False) -> dict[str, Any]:
        # model.forward runs whole (ZeRO-3 gathers the parameters CLIP holds itself around it);
        # the trunk's report comes back through the recorder, not as module state.
        with record_forward() as records:
            out = self.model(batch["image"].to(self.input_dtype), batch["text"])
        # the loss in fp32: a 16-bit softmax over global-batch logits loses the small terms
        scale = out["logit_scale"].float().clamp(max=MAX_LOGIT_SCALE)
        aux, row = reducer_terms(records, self.aux_loss_weight)
        features = {"image_features": out["image_features"], "text_features": out["text_features"]}
        if encode:
            return {"batched": features, "shared": {"logit_scale": scale}, **row,
                    **({} if aux is None else {"own_loss": aux})}
        result = {**self.coupled_loss(features, {"logit_scale": scale}), **row}
        if aux is not None:
            result["loss"] = result["loss"] + aux
        return result

    def coupled_loss(self, batched: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The contrastive loss over ``batched`` features (gathered across ranks by ``ClipLoss``)."""
        scale = shared["logit_scale"]
        contrastive = self.loss(batched["image_features"].float(), batched["text_features"].float(), scale)
        return {"loss": contrastive, "contrastive_loss": contrastive, "logit_scale": scale.detach()}


class CaptionStage:
    """A captioned sample -> (preprocessed image, caption tokens)."""

    keys = ("txt",)

    def __init__(self, preprocess, tokenizer) -> None:
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, image: Any, sample: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocess(image), self.tokenizer(sample["txt"].decode("utf-8"))[0]


def _folder_split(path: str, flag: str) -> ZeroShotSplit:
    if not os.path.isfile(os.path.join(path, "classnames.json")):
        raise ValueError(f"{flag} {path}: no classnames.json there "
                         f"(make one with tools/make_synthetic_shards, or use --imagenet-val)")
    return folder_split(path)


def _checked(split: ZeroShotSplit) -> ZeroShotSplit:
    if not os.path.isdir(split.image_dir):
        raise ValueError(f"zero-shot images: {split.image_dir} is not a directory")
    try:
        check_split(split)
    except ValueError as e:
        raise ValueError(f"zero-shot split: {e}; give one class name per class folder") from e
    return split


def zeroshot_splits(cfg: CLIPConfig) -> list[ZeroShotSplit]:
    """The evaluation splits: ImageNet or --zeroshot-data first (its rows keep the
    ``zeroshot_`` keys), then each --zeroshot-extra."""
    splits = []
    if cfg.imagenet_val:
        splits.append(imagenet_split(cfg.imagenet_val))
    elif cfg.zeroshot_data:
        splits.append(_folder_split(cfg.zeroshot_data, "--zeroshot-data"))
    splits += [_folder_split(d, "--zeroshot-extra") for d in cfg.zeroshot_extra or []]
    return [_checked(s) for s in splits]


@register_task("clip")
class CLIPTask(TaskBase):
    """``--task clip``: contrastive image-text pretraining on captioned shards, evaluated zero-shot."""

    Config = CLIPConfig
    train_layouts: ClassVar[frozenset[str]] = frozenset({"shards"})
    contrastive_memory = True
    batch_keys = ("image", "text")

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        add("--local-loss", action="store_true", help="contrastive loss over local x global features only")
        add("--gather-with-grad", action="store_true", help="gather features across ranks with gradients")
        add("--zeroshot-data", help="class-folder split with classnames.json and templates.json")
        add("--zeroshot-extra", nargs="+", metavar="DIR",
            help="more class-folder splits evaluated alongside (e.g. data/synth/layout), logged as NAME_top1, ...")
        add("--imagenet-val", help="ImageNet-1k val in class-folder layout (open_clip's class names and templates)")

    @classmethod
    def eval_splits(cls, cfg: CLIPConfig, ctx: SplitsContext) -> tuple[list[ZeroShotSplit], list[dict[str, Any]]]:
        return zeroshot_splits(cfg), []

    @classmethod
    def build_model(cls, model: str, client_state: dict[str, Any]) -> nn.Module:
        # 0-dim params break DeepSpeed broadcasts: nonscalar_logit_scale
        return open_clip.create_model(model, output_dict=True, nonscalar_logit_scale=True)

    def __init__(self, spec: TaskSpec) -> None:
        cfg: CLIPConfig = spec.config
        self.model, self.preprocess_train, self.preprocess_val = open_clip.create_model_and_transforms(
            spec.model, output_dict=True, nonscalar_logit_scale=True)
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.input_dtype = spec.input_dtype
        self.module = CLIPModule(self.model, spec.rank, spec.world, cfg.local_loss, cfg.gather_with_grad,
                                 spec.aux_loss_weight, spec.input_dtype)

    def data_stage(self) -> CaptionStage:
        return CaptionStage(self.preprocess_train, self.tokenizer)

    def evaluate(self, splits: Iterable[ZeroShotSplit], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int = 2) -> tuple[dict[str, float], list[str]]:
        """Zero-shot top-1/top-5 per split: the first split's keys ``zeroshot_*``, the others'
        ``NAME_*`` (:func:`dtp_ds.eval.zeroshot.evaluate_splits`, what ``tools/evaluate`` runs)."""
        row, lines, _ = evaluate_splits(self.model, self.tokenizer, self.preprocess_val, list(splits), device,
                                        self.input_dtype, batch_size, max_images, workers)
        return row, lines
