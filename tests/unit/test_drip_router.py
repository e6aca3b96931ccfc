"""The shipped DRIP predictor (H-Net's cosine router on the patch embeddings, its count following
content: ``adaptive``) under the invariances the MLP predictor is held to in test_drip.py:
low-precision extremes, padded-batch invariance, determinism, activation checkpointing and pinned
counts. The fixed count (``topk``, the ``DRIPTopK-*`` names) and H-Net's threshold selection are
held to the same."""
from __future__ import annotations

import pytest
import torch

from dtp_ds.models import CONFIG_DIR, POOL_TYPES, VisionTransformer, pinned_tokens, record_forward, registry
from dtp_ds.models.reducers.drip import DripReducer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# what every shipped DRIP config sets (checked against the shipped files below)
SHIPPED = {"predictor": "cosine", "predictor_input": "embed", "selection": "adaptive", "tied": True}
SELECTIONS = ["adaptive", "topk", "threshold"]


def router_trunk(selection: str = "topk", upsample: bool = False, pool: str = "mean_with_cls",
                 **kw) -> VisionTransformer:
    """32 px, patch 4 (64 patches), width 32; DRIP blocks 1 (pre) + 2 (shorten) [+ 1 (post)]."""
    post = 1 if upsample else 0
    reducer = DripReducer(dim=32, depth=3 + post, num_patches=64, pre=1, shorten=2, post=post, upsample=upsample,
                          compression=4, **{**SHIPPED, "selection": selection})
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3 + post, num_heads=2, num_classes=16,
                             global_pool=pool, reducer=reducer, **kw)


def blocky_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images of flat rectangles on flat backgrounds, each with its own number of rectangles:
    the router's cuts follow edges, so images differ in how many neighbouring pairs differ."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, 32, 32)
    for i in range(n):
        images[i] = 4 * torch.rand(3, 1, 1, generator=gen) - 2  # normalised pixels: either sign
        for _ in range(i % 4):
            x0, y0 = (int(v) for v in torch.randint(0, 24, (2,), generator=gen))
            w, h = (int(v) for v in torch.randint(4, 9, (2,), generator=gen))
            images[i, :, y0:y0 + h, x0:x0 + w] = 4 * torch.rand(3, 1, 1, generator=gen) - 2
    return images


def forward_aux(trunk: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with record_forward() as rec:
        out = trunk(images)
    (tower,) = rec
    return out, {**tower.aux_losses, **tower.stats}


def test_shipped_drip_configs_use_this_router() -> None:
    # the shipped files (the registry also holds what tests and exports registered since)
    for prefix, selection in (("DRIP-", "adaptive"), ("DRIPTopK-", "topk")):
        names = sorted(p.stem for p in CONFIG_DIR.glob(f"{prefix}*.json"))
        assert len(names) >= 26
        for name in names:
            cfg = registry.get_model_config(name)["vision_cfg"]["reducer_cfg"]
            assert {k: cfg.get(k) for k in SHIPPED} == {**SHIPPED, "selection": selection}, name


def calibrated(trunk: VisionTransformer) -> VisionTransformer:
    """An adaptive router's threshold calibrated by training forwards (a no-op for the others)."""
    if trunk.reducer.boundary_predictor.selection == "adaptive":
        trunk.train()
        with torch.no_grad():
            for seed in (1, 2):
                trunk(blocky_images(8, seed=seed))
    return trunk.eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("content", ["uniform", "extreme"])
def test_low_precision_extreme_inputs_no_nan(dtype: torch.dtype, content: str) -> None:
    """Parameters in fp16/bf16 as DeepSpeed holds them, fp32 images. ``uniform``: every patch
    identical (cosine 1, p at its floor, top-k among ties); ``extreme``: +-1e4 checkerboard
    patches (cosine -1, p at its ceiling; fp16's range at the embedding)."""
    torch.manual_seed(0)
    trunk = router_trunk(upsample=True).to(dtype)
    if content == "uniform":
        images = torch.full((3, 3, 32, 32), 0.3)
    else:
        sign = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1.0
        images = (1e4 * sign).repeat_interleave(4, 0).repeat_interleave(4, 1).expand(3, 3, 32, 32).contiguous()
    for train in (True, False):
        trunk.train(train)
        trunk.zero_grad()
        out, aux = forward_aux(trunk, images)
        (out.float().square().mean() + aux["boundary_loss"]).backward()
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert aux["compression"].item() == pytest.approx(64 / 17)  # top-k: round(1 + 63 / 4) segments, any content
        for name, p in trunk.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_router_probabilities_stay_fp32_under_autocast() -> None:
    trunk = router_trunk()
    seen = {}
    trunk.reducer.boundary_predictor.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trunk(blocky_images(2))
    assert out.dtype == torch.bfloat16
    assert seen["out"].probs.dtype == torch.float32 and seen["out"].logits.dtype == torch.float32


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("pool", POOL_TYPES)
def test_eval_batch_invariance_and_determinism(selection: str, upsample: bool, pool: str) -> None:
    torch.manual_seed(0)
    trunk = calibrated(router_trunk(selection, upsample=upsample, pool=pool))
    images = blocky_images(6)
    with torch.no_grad():
        batched = trunk(images)
        tokens, valid = trunk.forward_tokens_valid(images)
        lengths = valid.sum(1)
        assert torch.equal(trunk.forward_features(images), tokens)  # timm's contract: the tokens alone
        alone = torch.cat([trunk(images[i:i + 1]) for i in range(len(images))])
        again = trunk(images)
    if selection in ("threshold", "adaptive") and not upsample:
        assert lengths.min() < lengths.max()  # padding really exercised: a count per image
    if selection == "topk" and not upsample:
        assert torch.all(lengths == 1 + 17)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched, again)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_boundaries_follow_edges_not_positions(selection: str) -> None:
    """Where the cuts go depends on the image: two different images get different segments
    (evenly spaced boundaries would give them the same), and a flat image cut by threshold is one segment."""
    trunk = calibrated(router_trunk(selection))
    with torch.no_grad(), record_forward() as rec:
        trunk(blocky_images(4))
    groups = rec[0].groups
    assert not torch.equal(groups[1], groups[2])
    if selection in ("threshold", "adaptive"):
        with torch.no_grad():
            _, aux = forward_aux(trunk, torch.full((1, 3, 32, 32), 0.5))
        assert aux["compression"].item() == pytest.approx(64.0)


def _run(trunk: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trunk.zero_grad()
    torch.manual_seed(123)  # the same drop-path draws both times
    out, aux = forward_aux(trunk, images)
    (out.square().mean() + aux["boundary_loss"]).backward()
    return out.detach(), {n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("upsample", [False, True])
def test_checkpointing_same_outputs_and_grads(selection: str, upsample: bool) -> None:
    torch.manual_seed(0)
    trunk = router_trunk(selection, upsample=upsample, drop_path_rate=0.1).train()
    images = blocky_images(4)
    out_ref, grads_ref = _run(trunk, images)
    assert grads_ref["reducer.boundary_predictor.q.weight"].abs().sum() > 0  # the router is trained
    trunk.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _run(trunk, images)
    torch.testing.assert_close(out_ckpt, out_ref)
    assert grads_ckpt.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], g, msg=name)
    if selection == "adaptive":  # recomputed blocks do not calibrate twice: one step per forward
        assert int(trunk.reducer.boundary_predictor.calibration_steps) == 2


@pytest.mark.parametrize("selection", SELECTIONS)
def test_pinned_tokens_cut_exactly_that_many_segments(selection: str) -> None:
    trunk = calibrated(router_trunk(selection))
    for segments in (1, 7, 16, 63, 64):
        with pinned_tokens(trunk, segments):
            _, aux = forward_aux(trunk, blocky_images(3))
            assert aux["compression"].item() == pytest.approx(64 / segments)
    assert trunk.reducer.boundary_predictor.forced_segments is None
    with pytest.raises(ValueError, match="segments must be in"), pinned_tokens(trunk, 65):
        trunk(blocky_images(1))
