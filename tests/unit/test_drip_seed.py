"""The seed's DRIP, named: every DRIP router config (``DRIP-ViT-...``, H-Net's cosine router) has a
twin ``DRIPGumbel-ViT-...`` with DTP's predictor as the seed describes it (an MLP, Gumbel-Sigmoid
boundaries made hard with a straight-through estimator, the Binomial rate loss, one segment
count per image), on the same trunk, layout and compression. Each twin builds, trains a step at
tiny width with its rate loss live, and cuts a number of segments that depends on the image."""
from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch

import dtp_ds
from dtp_ds.eval.size_configs import GUMBEL_TEMPERATURE, gumbel_twin_config, gumbel_twin_name
from dtp_ds.eval.sizing import flops_target
from dtp_ds.models import expected_segments, get_model_config, record_forward, register_config, registry, trunks
from dtp_ds.models.boundary import MLPBoundaryPredictor

ROUTERS = [n for n in dtp_ds.list_models() if n.startswith("DRIP-ViT-")]
TWINS = [gumbel_twin_name(n) for n in ROUTERS]
TINY_VISION = {"width": 64, "head_width": 32}
TINY_TEXT = {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
GRID = 4  # 16 patches: a 10x twin still makes a few segments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, cfg: dict) -> torch.nn.Module:
    register_config(name, cfg)
    try:
        torch.manual_seed(0)
        return open_clip.create_model(name, output_dict=True)
    finally:
        registry._REGISTERED.pop(name, None)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def tiny(name: str) -> torch.nn.Module:
    """``name`` at tiny width (its layout, reducer and options as shipped; the predictor's hidden
    width kept at the shipped ratio to the trunk's)."""
    cfg = copy.deepcopy(get_model_config(name))
    vision = cfg["vision_cfg"]
    ratio = vision["reducer_cfg"]["predictor_hidden"] // vision["width"]
    vision.update(TINY_VISION, image_size=GRID * vision["patch_size"])
    vision["reducer_cfg"]["predictor_hidden"] = ratio * TINY_VISION["width"]
    cfg["text_cfg"].update(TINY_TEXT)
    cfg["embed_dim"] = 32
    return build(f"test-tiny-{name}", cfg)


def predictor_of(model: torch.nn.Module) -> MLPBoundaryPredictor:
    return trunks(model)[0].reducer.boundary_predictor


def losses(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with record_forward() as rec:
        out = model(images, texts)
    clip = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    return clip, rec[0].aux_losses["boundary_loss"]


def test_every_router_name_has_its_gumbel_twin() -> None:
    assert len(ROUTERS) == 26 and set(TWINS) <= set(dtp_ds.list_models()) <= set(open_clip.list_models())
    assert not [n for n in dtp_ds.list_models() if n.startswith("DRIPGumbel-") and n not in TWINS]
    for router, twin in zip(ROUTERS, TWINS):
        cfg, rcfg = get_model_config(twin), get_model_config(router)
        stated = cfg.pop("flops_target")
        assert cfg == gumbel_twin_config(router)  # what tools/size_configs --gumbel-twins writes
        rc, rrc = cfg["vision_cfg"].pop("reducer_cfg"), rcfg["vision_cfg"].pop("reducer_cfg")
        rcfg.pop("flops_target")
        assert cfg == rcfg  # the same trunk and towers
        assert {k: rc[k] for k in ("pre", "shorten", "post", "upsample", "compression")} == \
               {k: rrc[k] for k in ("pre", "shorten", "post", "upsample", "compression")}
        width = cfg["vision_cfg"]["width"]
        assert rc["predictor"] == "mlp" and rc["temperature"] == GUMBEL_TEMPERATURE == 0.5
        assert rc["predictor_hidden"] == 4 * width  # DTP's d_inner: the feed-forward width
        assert rc["eval_rule"] == "expected" and rc["straight_through"] == "cumsum"
        assert rc["predictor_input"] == "tokens"
        assert flops_target(twin)["count"] == "inference" and 0.0 < stated["ratio"] < 1.0


@pytest.mark.parametrize("name", TWINS)
def test_twin_trains_a_step_at_tiny_width_with_a_live_rate_loss(name: str) -> None:
    model = tiny(name).train()
    pred = predictor_of(model)
    assert isinstance(pred, MLPBoundaryPredictor) and pred.eval_rule == "expected"
    images, texts = torch.randn(4, 3, *model.visual.image_size), torch.randint(1, 1000, (4, 8))
    # the rate loss alone reaches the predictor (DTP's Binomial prior; the router's top-k has none)
    torch.manual_seed(1)
    _, rate = losses(model, images, texts)
    assert rate.item() > 0.0
    rate.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.parameters())
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in pred.named_parameters()}
    torch.manual_seed(1)
    clip, rate = losses(model, images, texts)
    (clip + rate).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in pred.named_parameters())


def rectangles(count: int, size: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Images on a plain background with 0..6 random rectangles (image ``i`` has ``i % 7``)."""
    rng = np.random.default_rng(seed)
    out, objects = [], np.arange(count) % 7
    for k in objects:
        img = np.tile(rng.uniform(-1, 1, 3)[:, None, None], (1, size, size))
        for _ in range(k):
            x, y = rng.integers(0, size - size // 8, 2)
            w, h = rng.integers(size // 10, size // 3, 2)
            img[:, y:y + h, x:x + w] = rng.uniform(-1, 1, 3)[:, None, None]
        out.append(img)
    return torch.tensor(np.stack(out), dtype=torch.float32), objects


def segments_of(trunk: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), record_forward() as rec:
        trunk(images)
    return rec[0].groups[:, -1] + 1


def test_segment_count_varies_with_the_image() -> None:
    """The Tiny twin as shipped: in training the Gumbel sample's count is per image, about the
    prior's; with its predictor made content-sensitive (an untrained one sits at logit(prior)
    everywhere) evaluation (the ``expected`` rule, deterministic) gives each image its own
    count, which does not depend on the rest of the batch."""
    torch.manual_seed(0)
    model = dtp_ds.create_model("DRIPGumbel-ViT-Tiny-8-4x")
    trunk = trunks(model)[0]
    images, _ = rectangles(14, trunk.img_size[0])
    trunk.train()  # untrained, near its prior: the Gumbel sample's count differs by image about the prior's
    sampled = segments_of(trunk, images).float()
    assert sampled.std() > 0 and sampled.mean().item() == pytest.approx(expected_segments(64, 0.25), rel=0.25)
    with torch.no_grad():
        trunk.reducer.boundary_predictor.fc2.weight.normal_(0.0, 0.5)
    trunk.eval()
    counts = segments_of(trunk, images).float()
    assert counts.std() / counts.mean() > 0.02 and len(set(counts.tolist())) > 2, counts
    assert torch.equal(segments_of(trunk, images).float(), counts)  # deterministic
    alone = torch.stack([segments_of(trunk, images[i:i + 1])[0] for i in range(3)]).float()
    assert torch.equal(alone, counts[:3])  # batch-invariant
