"""CLIP: an open_clip model (any image trunk) + the contrastive loss + the reducer's auxiliary
losses; captioned image shards; zero-shot evaluation.

Cross-rank work (gathering features for the contrastive loss) lives in open_clip's
``ClipLoss``; the model stays single-device code.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import nn

from dtp_ds.eval.zeroshot import ZeroShotSplit, evaluate_splits
from dtp_ds.models import TowerOutput, record_forward, reducers_of

from . import TaskSpec, register_task

# open_clip clamps the learned temperature at 100 after every step (clamp_ on the
# parameter); clamping the value in the forward does the same without touching a
# parameter that ZeRO-3 may have partitioned away.
MAX_LOGIT_SCALE = 100.0


def reducer_terms(records: list[TowerOutput], weight: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The weighted sum of the image trunk's auxiliary losses (``None`` without any), and the
    row entries: each auxiliary loss and statistic (detached) and ``image_tokens``, averaged over
    the trunk forwards the records hold."""
    if not records:
        return None, {}
    keys = {**records[0].aux_losses, **records[0].stats}
    row = {k: torch.stack([(r.aux_losses.get(k, r.stats.get(k))).float().reshape(()) for r in records]).mean()
           for k in keys}
    # mean tokens per sample over the blocks: what the trunk's compute scales with
    row["image_tokens"] = torch.stack([r.token_counts.float().mean() for r in records]).mean()
    aux = [row[k] for k in records[0].aux_losses]
    total = weight * torch.stack(aux).sum() if aux else None
    return total, {k: v.detach() for k, v in row.items()}


def reducer_schedules(model: nn.Module, total_steps: int) -> dict[str, Any]:
    """The schedules the model's token reducers need over the run, named by reducer."""
    found = ((f"reducer{i}_{r.type_name}", r.schedule(total_steps)) for i, r in enumerate(reducers_of(model)))
    return {name: s for name, s in found if s is not None}


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


class CLIPTask:
    """``--task clip``: contrastive image-text pretraining, evaluated zero-shot."""

    name = "clip"
    batch_keys = ("image", "text")

    def __init__(self, spec: TaskSpec) -> None:
        # 0-dim params break DeepSpeed broadcasts: nonscalar_logit_scale
        self.model, self.preprocess_train, self.preprocess_val = open_clip.create_model_and_transforms(
            spec.model, output_dict=True, nonscalar_logit_scale=True)
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.input_dtype = spec.input_dtype
        self.module = CLIPModule(self.model, spec.rank, spec.world, spec.options.get("local_loss", False),
                                 spec.options.get("gather_with_grad", False), spec.aux_loss_weight, spec.input_dtype)

    def data_stage(self) -> CaptionStage:
        return CaptionStage(self.preprocess_train, self.tokenizer)

    def schedules(self, total_steps: int) -> dict[str, Any]:
        return reducer_schedules(self.model, total_steps)

    def evaluate(self, splits: Iterable[ZeroShotSplit], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int = 2) -> tuple[dict[str, float], list[str]]:
        """Zero-shot top-1/top-5 per split: the first split's keys ``zeroshot_*``, the others'
        ``NAME_*`` (:func:`dtp_ds.eval.zeroshot.evaluate_splits`, what ``tools/evaluate`` runs)."""
        row, lines, _ = evaluate_splits(self.model, self.tokenizer, self.preprocess_val, list(splits), device,
                                        self.input_dtype, batch_size, max_images, workers)
        return row, lines


register_task("clip")(CLIPTask)
