"""The training task: a CLIP model plus its losses, returning a dict with "loss".

The engine loop is then ``out = engine(images, texts); engine.backward(out["loss"]); engine.step()``.
Cross-rank work (gathering features for the contrastive loss) lives in open_clip's
``ClipLoss``; the model stays single-device code.
"""
from __future__ import annotations

import torch
from open_clip.loss import ClipLoss
from torch import nn

from dtp_ds.models import drip_aux

# open_clip clamps the learned temperature at 100 after every step (clamp_ on the
# parameter); clamping the value in the forward does the same without touching a
# parameter that ZeRO-3 may have partitioned away.
MAX_LOGIT_SCALE = 100.0


class CLIPTask(nn.Module):
    """CLIP model + contrastive loss (+ DRIP boundary-rate loss when the model has one)."""

    def __init__(
        self,
        model: nn.Module,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        boundary_loss_weight: float = 1.0,
        input_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.model = model
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=rank, world_size=world_size)
        self.boundary_loss_weight = boundary_loss_weight
        self.input_dtype = input_dtype  # DeepSpeed's bf16/fp16 modes cast the weights, not the inputs

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images.to(self.input_dtype), texts)
        # the loss in fp32: a 16-bit softmax over global-batch logits loses the small terms
        scale = out["logit_scale"].float().clamp(max=MAX_LOGIT_SCALE)
        contrastive = self.loss(out["image_features"].float(), out["text_features"].float(), scale)
        result = {"contrastive_loss": contrastive, "logit_scale": scale.detach()}
        loss = contrastive
        aux = drip_aux(self.model)
        if aux:
            loss = loss + self.boundary_loss_weight * aux["boundary_loss"].float()
            result.update({k: (v if k == "boundary_loss" else v.detach()) for k, v in aux.items()})
        result["loss"] = loss
        return result


# Parameter-name parts that take no weight decay, besides every tensor of < 2 dims (gains,
# biases, the class embedding): open_clip's trainer's names, plus the token and position
# embeddings (open_clip's ``token_embedding`` / ``positional_embedding``, DRIP's
# ``pos_embed`` / ``cls_token``), which open_clip decays because they are 2-d.
NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale", "embedding", "pos_embed", "cls_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
