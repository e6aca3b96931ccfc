"""Image-tower compute of a model name as a ratio to its plain trunk, measured on real images.

A shipped config may state a ``flops_target``: ``{"ratio": 0.4, "count": "inference"}`` promises
that its image tower, in eval mode on real images, runs 0.4x the FLOPs of the same trunk without
a token reducer (``reducer_cfg`` ``none``) at ``reference_image_size`` (default: the config's
own). ``"count": "train"`` measures a training-mode forward instead (patch dropout: evaluation
sees every patch, training is what it cuts). :func:`measured_ratio` is the measurement the test
pins every shipped target with; ``tools/size_configs`` (:mod:`dtp_ds.bench.size_configs`) solves
each family's knob for a target and writes the configs.

FLOPs are torch's FlopCounterMode (attention included), halved to 1 multiply-add = 1 FLOP.
Weights are random (a trunk built on the meta device and filled: minutes less at ViT-H), which
is what every shipped reducer's token count is independent of at evaluation: they keep a fixed
count per block (DRIP's top-k selection, DynamicViT's top-k, ToMe's r, TokenLearner's and
grouping's token counts), so the ratio is a property of the config, not of training.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

import torch
from torch import nn

from dtp_ds.data.decode import decode_image
from dtp_ds.eval.boundaries import list_images
from dtp_ds.eval.flops import torch_macs
from dtp_ds.models import VisionTransformer, make_reducer
from dtp_ds.models.registry import _trunk_kwargs, get_model_config, upgrade_vision_cfg

COUNTS = ("inference", "train")


def flops_target(name: str) -> dict[str, Any] | None:
    """A registered config's ``flops_target`` (checked), or ``None`` if it states none."""
    target = (get_model_config(name) or {}).get("flops_target")
    if target is None:
        return None
    unknown = set(target) - {"ratio", "count", "reference_image_size", "note"}
    if unknown or "ratio" not in target or target.get("count", "inference") not in COUNTS:
        raise ValueError(f"{name}: flops_target needs 'ratio', optional 'count' in {COUNTS}, "
                         f"'reference_image_size', 'note'; got {target}")
    return {"count": "inference", **target}


def build_trunk(trunk_kwargs: dict[str, Any], num_classes: int) -> VisionTransformer:
    """A plain trunk (``reducer`` none) from registry trunk kwargs, with random weights: built on
    the meta device and filled in place (normal(0.02) matrices, unit LayerNorms, zero biases),
    which takes seconds where the trunk's own initialisation takes a minute at ViT-H."""
    with torch.device("meta"):
        model = VisionTransformer(**trunk_kwargs, num_classes=num_classes)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif p.ndim == 1 and pname == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model


@functools.lru_cache(maxsize=2)
def _cached_trunk(trunk_json: str, num_classes: int) -> VisionTransformer:
    return build_trunk(json.loads(trunk_json), num_classes)


@functools.lru_cache(maxsize=4)
def _images(image_dir: str, size: int, count: int) -> torch.Tensor:
    from open_clip.transform import image_transform

    transform = image_transform(size, is_train=False)
    return torch.stack([transform(decode_image(p)) for p in list_images(image_dir, count)])


def tower_gflops(model: VisionTransformer, images: torch.Tensor, count: str = "inference") -> float:
    """GFLOPs per image of ``model`` on ``images``; ``count="train"``: a training-mode forward."""
    model.train(count == "train")
    with torch.no_grad():
        return torch_macs(model, (images,)) / 1e9 / len(images)


def _gflops(name: str, vision: dict[str, Any], num_classes: int, images: torch.Tensor, count: str) -> float:
    """GFLOPs of the trunk ``vision`` describes: one filled plain trunk per shape (cached), its
    reducer swapped in for the count (trunk weights are what every reducer shares)."""
    kwargs = _trunk_kwargs(name, upgrade_vision_cfg(copy.deepcopy(vision)))
    t = kwargs["trunk"]
    trunk = _cached_trunk(json.dumps(t, sort_keys=True), num_classes)
    reducer = make_reducer(kwargs["reducer_cfg"], t["embed_dim"], t["depth"], trunk.num_patches)
    reducer.check(trunk)
    plain, trunk.reducer = trunk.reducer, reducer
    try:
        return tower_gflops(trunk, images, count)
    finally:
        trunk.reducer = plain


def measured_ratio(name: str, image_dir: str, images: int = 1,
                   cfg: dict[str, Any] | None = None) -> dict[str, float]:
    """Image-tower GFLOPs of ``name`` (or of ``cfg``, a config not registered) on ``images``
    real images from ``image_dir`` against its plain trunk, as its ``flops_target`` counts them."""
    cfg = copy.deepcopy(cfg or get_model_config(name))
    target = cfg.get("flops_target") or {}
    count = target.get("count", "inference")
    vision = cfg["vision_cfg"]
    size = vision.get("image_size", 224)
    ref_size = target.get("reference_image_size", size)
    plain = {**upgrade_vision_cfg(copy.deepcopy(vision)), "reducer_cfg": {"type": "none"}, "image_size": ref_size}
    gflops = _gflops(name, vision, cfg["embed_dim"], _images(image_dir, size, images), count)
    plain_gflops = _gflops(name, plain, cfg["embed_dim"], _images(image_dir, ref_size, images), "inference")
    return {"gflops": gflops, "plain_gflops": plain_gflops, "ratio": gflops / plain_gflops}
