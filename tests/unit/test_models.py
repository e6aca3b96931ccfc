"""Every registered model name, at tiny width, runs forward + backward with every parameter
receiving a gradient (timm's ``test_models.py``): the layout (layers, patch grid, reducer and its
options, pooling, stem) is the shipped one, only widths, image and text shrink."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch

import dtp_ds
from dtp_ds.models import get_model_config, record_forward, register_config, registry, trunks

TINY_VISION = {"width": 64, "head_width": 32}  # 2 heads
TINY_TEXT = {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
GRID = 4  # patches per side: 16 patches, so a 10x reducer still makes a few segments
PLAIN_TRUNK = "test-tiny-plain-trunk"  # the shared trunk with no reducer: a plain ViT


def tiny_config(name: str) -> dict:
    cfg = copy.deepcopy(get_model_config(name))
    vision = cfg["vision_cfg"]
    vision.update(TINY_VISION, image_size=GRID * vision.get("patch_size", 16))
    for key in ("reducer_cfg", "drip_cfg"):
        if key in vision:
            vision[key].pop("predictor_hidden", None)  # the predictor's width follows the trunk's
    cfg["text_cfg"].update(TINY_TEXT)
    cfg["embed_dim"] = 32
    return cfg


PLAIN_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "patch_size": 8, **TINY_VISION,
                   "trunk_cfg": {"pool": "mean_with_cls"}, "reducer_cfg": {"type": "none"}},
    "text_cfg": TINY_TEXT,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_tiny(name: str) -> torch.nn.Module:
    tiny = f"test-tiny-{name}"
    register_config(tiny, PLAIN_CFG if name == PLAIN_TRUNK else tiny_config(name))
    try:
        torch.manual_seed(0)
        return open_clip.create_model(tiny, output_dict=True)
    finally:
        registry._REGISTERED.pop(tiny, None)
        open_clip.factory._MODEL_CONFIGS.pop(tiny, None)


@pytest.mark.parametrize("name", [*dtp_ds.list_models(), PLAIN_TRUNK])
def test_tiny_forward_backward_every_parameter_gets_a_gradient(name: str) -> None:
    model = build_tiny(name).train()
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    images, texts = torch.randn(4, 3, *size), torch.randint(1, 1000, (4, TINY_TEXT["context_length"]))
    with record_forward() as rec:
        out = model(images, texts)
    loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    for tower in rec:  # every auxiliary loss the reducers report, as training adds them
        loss = loss + sum(tower.aux_losses.values())
    loss.backward()
    assert out["image_features"].shape == (4, 32) and torch.isfinite(loss)
    found = trunks(model)
    assert len(rec) == len(found)  # one record per trunk forward (none for open_clip's own tower)
    for tower, trunk in zip(rec, found):
        assert tower.token_counts.shape == (len(trunk.blocks),)
    if name == PLAIN_TRUNK:
        assert found[0].reducer.type_name == "none" and rec[0].aux_losses == {}
        assert rec[0].token_counts.tolist() == [17.0, 17.0]  # every patch + CLS in every block
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not missing, missing
