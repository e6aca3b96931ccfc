"""The router's count follows content (``selection: "adaptive"``): in training one top-k over the
batch's B x (L - 1) neighbouring pairs, so the batch's mean count meets the rate while a plain
image gives its budget to a busy one; in evaluation a threshold calibrated in training (a
running mean of the batch's threshold, a buffer), so an image's segments are deterministic and
never depend on the rest of the batch; at most a per-image cap of segments (packed attention
pads a batch to its longest image). The shipped ``DRIP-*`` routers are adaptive; the fixed count
(``"topk"``) stays a named option, the ``DRIPTopK-*`` twins."""
from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch

import dtp_ds
from dtp_ds.eval.size_configs import ADAPTIVE_TARGET_NOTE, ROUTER_SELECTION, router_config, topk_twin_name
from dtp_ds.models import (
    VisionTransformer,
    expected_segments,
    get_model_config,
    record_forward,
    register_config,
    registry,
    trunks,
)
from dtp_ds.models.boundary import MAX_SEGMENTS_RATIO, SELECTIONS, CosineBoundaryPredictor
from dtp_ds.models.reducers.drip import DripReducer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCHES = 64  # 32 px, patch 4
RATE = 0.25  # 4x
TARGET = expected_segments(PATCHES, RATE)  # 16.75 segments per image on average


def small_trunk(selection: str = "adaptive", upsample: bool = False, momentum: float = 0.9,
                cap_ratio: float = MAX_SEGMENTS_RATIO) -> VisionTransformer:
    """The shipped router (cosine, tied, on the patch embeddings) on a 32 px, width-32 trunk."""
    torch.manual_seed(0)
    post = 1 if upsample else 0
    reducer = DripReducer(dim=32, depth=3 + post, num_patches=PATCHES, pre=1, shorten=2, post=post,
                          upsample=upsample, compression=1 / RATE, predictor="cosine", predictor_input="embed",
                          selection=selection, tied=True, threshold_momentum=momentum,
                          max_segments_ratio=cap_ratio)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3 + post, num_heads=2, num_classes=16,
                             reducer=reducer)


def rectangles(count: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Plain backgrounds with 0..6 random rectangles (image ``i`` has ``i % 7``)."""
    rng = np.random.default_rng(seed)
    out, objects = [], np.arange(count) % 7
    for k in objects:
        img = np.tile(rng.uniform(-1, 1, 3)[:, None, None], (1, size, size))
        for _ in range(k):
            x, y = rng.integers(0, size - 4, 2)
            w, h = rng.integers(3, 12, 2)
            img[:, y:y + h, x:x + w] = rng.uniform(-1, 1, 3)[:, None, None]
        out.append(img)
    return torch.tensor(np.stack(out), dtype=torch.float32), objects


def run(trunk: VisionTransformer, images: torch.Tensor, grad: bool = False):
    with torch.set_grad_enabled(grad), record_forward() as rec:
        out = trunk(images)
    (tower,) = rec
    return out, tower, (tower.groups[:, -1] + 1).float()


def calibrate(trunk: VisionTransformer, steps: int = 40, batch: int = 28) -> list[float]:
    """Training forwards on fresh batches; the mean segment count of each."""
    trunk.train()
    return [run(trunk, rectangles(batch, seed=100 + s)[0])[2].mean().item() for s in range(steps)]


def predictor(trunk: VisionTransformer) -> CosineBoundaryPredictor:
    return trunk.reducer.boundary_predictor


def test_selections_and_refusals() -> None:
    assert SELECTIONS == ("threshold", "topk", "adaptive")
    with pytest.raises(ValueError, match="selection must be one of"):
        CosineBoundaryPredictor(8, 0.25, selection="batch")
    with pytest.raises(ValueError, match="threshold_momentum"):
        CosineBoundaryPredictor(8, 0.25, selection="adaptive", threshold_momentum=1.0)
    # only the adaptive router carries a calibration: the others' checkpoints keep their keys
    assert set(CosineBoundaryPredictor(8, 0.25, selection="topk", tied=True).state_dict()) == {"q.weight"}
    assert set(CosineBoundaryPredictor(8, 0.25, selection="adaptive", tied=True).state_dict()) == \
           {"q.weight", "threshold", "calibration_steps"}
    adaptive = small_trunk()
    assert not predictor(adaptive).same_count_per_image
    assert adaptive.reducer.planned_tokens(PATCHES, 3)[1] == TARGET + 1  # the mean, not a rounded count


def test_count_follows_content_and_the_batch_meets_the_rate() -> None:
    trunk = small_trunk().train()
    images, objects = rectangles(42)
    _, tower, counts = run(trunk, images)
    cv = (counts.std(unbiased=False) / counts.mean()).item()
    corr = np.corrcoef(counts.numpy(), objects)[0, 1]
    assert cv >= 0.15 and corr > 0.5, (cv, corr, counts)
    assert counts[objects == 0].max() < counts[objects == 6].min()  # a plain image is one segment or few
    assert counts.mean().item() == pytest.approx(TARGET, rel=0.05)
    # the fixed count on the same images: every image the same
    _, _, fixed = run(small_trunk("topk").train(), images)
    assert fixed.unique().tolist() == [round(TARGET)]


def test_every_training_batch_meets_the_rate() -> None:
    means = calibrate(small_trunk(), steps=10)
    assert means == pytest.approx([TARGET] * 10, rel=0.05)


@pytest.mark.parametrize("upsample", [False, True])
def test_packed_variable_lengths_train_with_gradients(upsample: bool) -> None:
    trunk = small_trunk(upsample=upsample).train()
    images, _ = rectangles(14)
    out, tower, counts = run(trunk, images, grad=True)
    assert counts.unique().numel() > 3  # rows of several lengths in one packed batch
    rate = tower.aux_losses["boundary_loss"]
    assert rate.item() == 0.0 and rate.requires_grad  # the count is met by construction
    (out.square().mean() + rate).backward()
    missing = [n for n, p in trunk.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert predictor(trunk).q.weight.grad.abs().sum() > 0  # the confidence-weighted straight-through path


def test_eval_is_deterministic_batch_invariant_and_near_the_training_compression() -> None:
    trunk = small_trunk(momentum=0.9)
    train_means = calibrate(trunk)
    pred = predictor(trunk)
    assert int(pred.calibration_steps) == len(train_means) and 0.0 < pred.threshold.item() < 1.0
    trunk.eval()
    images, objects = rectangles(70, seed=7)
    out, _, counts = run(trunk, images)
    out2, _, counts2 = run(trunk, images)
    assert torch.equal(counts, counts2) and torch.equal(out, out2)
    for i in (0, 3, 6, 13):  # an image alone, and inside a batch of others
        alone_out, _, alone = run(trunk, images[i:i + 1])
        assert alone.item() == counts[i].item()
        torch.testing.assert_close(alone_out[0], out[i], rtol=1e-4, atol=1e-5)
    # evaluation's compression within 15% of training's, and the count still follows content
    train_compression = PATCHES / np.mean(train_means[-10:])
    eval_compression = PATCHES / counts.mean().item()
    assert eval_compression == pytest.approx(train_compression, rel=0.15)
    assert (counts.std(unbiased=False) / counts.mean()).item() >= 0.15
    assert np.corrcoef(counts.numpy(), objects)[0, 1] > 0.5


def test_before_calibration_eval_uses_the_per_image_budget() -> None:
    trunk = small_trunk().eval()
    _, _, counts = run(trunk, rectangles(14)[0])
    assert counts.unique().tolist() == [round(TARGET)]


def test_the_cap_refuses_a_ratio_the_rate_cannot_fit_under() -> None:
    for ratio in (1.0, 0.5):
        with pytest.raises(ValueError, match="max_segments_ratio must be > 1"):
            CosineBoundaryPredictor(8, 0.25, selection="adaptive", max_segments_ratio=ratio)
    pred = CosineBoundaryPredictor(8, 0.25, selection="adaptive")
    assert pred.segment_cap(PATCHES) == round(MAX_SEGMENTS_RATIO * TARGET) == 34
    # never below the mean (so the batch's total is reachable), never over the patches
    assert CosineBoundaryPredictor(8, 0.25, selection="adaptive", max_segments_ratio=1.01).segment_cap(PATCHES) == 17
    assert CosineBoundaryPredictor(8, 0.75, selection="adaptive").segment_cap(PATCHES) == PATCHES
    assert CosineBoundaryPredictor(8, 0.25, selection="topk").segment_cap(PATCHES) == PATCHES  # no cap


CAP_RATIO = 1.3  # a cap of 22 segments, under what the busiest rectangles images take uncapped
CAP = 22


def test_the_cap_holds_in_training_and_the_batch_still_meets_the_rate() -> None:
    images, objects = rectangles(42)
    uncapped = run(small_trunk(cap_ratio=100.0).train(), images)[2]
    assert uncapped.max().item() > CAP  # the cap below binds
    trunk = small_trunk(cap_ratio=CAP_RATIO).train()
    assert predictor(trunk).segment_cap(PATCHES) == CAP
    _, _, counts = run(trunk, images)
    assert counts.max().item() == CAP  # held, and reached: the busiest images give budget back
    total = round(42 * RATE * (PATCHES - 1))
    assert counts.sum().item() == total + 42  # the batch's total exactly, as uncapped
    assert uncapped.sum().item() == total + 42
    assert np.corrcoef(counts.numpy(), objects)[0, 1] > 0.5  # still follows content
    # the memory plan's padded length is the cap (a batch's busiest image reaches it)
    plan = trunk.reducer.plan(PATCHES, 3, 32)
    assert plan.padded[1] == CAP + 1 and plan.tokens[1] == TARGET + 1


def test_the_cap_holds_in_evaluation_per_image() -> None:
    trunk = small_trunk(momentum=0.9, cap_ratio=CAP_RATIO)
    train_means = calibrate(trunk)
    assert train_means == pytest.approx([TARGET] * len(train_means), rel=0.05)
    trunk.eval()
    images = rectangles(70, seed=7)[0]
    _, _, counts = run(trunk, images)
    assert counts.max().item() == CAP
    assert torch.equal(run(trunk, images)[2], counts)  # deterministic
    for i in range(0, 70, 5):  # batch-invariant: an image alone gets what it got among others
        assert run(trunk, images[i:i + 1])[2].item() == counts[i].item()
    # without the cap the same calibration cuts the busiest images further
    free = small_trunk(momentum=0.9, cap_ratio=100.0)
    free.load_state_dict(trunk.state_dict())
    assert run(free.eval(), images)[2].max().item() > CAP


def test_checkpoint_carries_the_calibrated_threshold() -> None:
    trunk = small_trunk()
    calibrate(trunk, steps=8)
    state = copy.deepcopy(trunk.state_dict())
    key = "reducer.boundary_predictor.threshold"
    assert state[key].item() == predictor(trunk).threshold.item() != 0.5
    assert state["reducer.boundary_predictor.calibration_steps"].item() == 8
    fresh = small_trunk()
    fresh.load_state_dict(state)
    images = rectangles(21, seed=5)[0]
    trunk.eval(), fresh.eval()
    assert torch.equal(run(fresh, images)[2], run(trunk, images)[2])
    # the EMA stays fp32 when the model is cast (bf16 rounding would freeze its updates)
    fresh.bfloat16()
    assert predictor(fresh).threshold.dtype == torch.float32
    assert predictor(fresh).threshold.item() == state[key].item()


def test_pinned_segments_leave_the_calibration_alone() -> None:
    trunk = small_trunk().train()
    trunk.reducer.pin(8)
    _, _, counts = run(trunk, rectangles(14)[0])
    assert counts.unique().tolist() == [8.0] and int(predictor(trunk).calibration_steps) == 0


def test_every_router_name_is_adaptive_and_has_its_fixed_count_twin() -> None:
    routers = [n for n in dtp_ds.list_models() if n.startswith("DRIP-ViT-")]
    twins = [topk_twin_name(n) for n in routers]
    assert len(routers) == 26 and set(twins) <= set(dtp_ds.list_models()) <= set(open_clip.list_models())
    assert not [n for n in dtp_ds.list_models() if n.startswith("DRIPTopK-") and n not in twins]
    for router, twin in zip(routers, twins):
        cfg, tcfg = get_model_config(router), get_model_config(twin)
        assert cfg["vision_cfg"]["reducer_cfg"]["selection"] == ROUTER_SELECTION == "adaptive"
        assert tcfg["vision_cfg"]["reducer_cfg"]["selection"] == "topk"
        stated, tstated = cfg.pop("flops_target"), tcfg.pop("flops_target")
        # what tools/size_configs --router-selections writes; the same compute untrained
        assert cfg == router_config(router, "adaptive") and tcfg == router_config(router, "topk")
        assert stated["ratio"] == tstated["ratio"] and tstated["note"] == "measured when shipped"
        assert stated["note"] == ADAPTIVE_TARGET_NOTE
        cfg["vision_cfg"]["reducer_cfg"].pop("selection"), tcfg["vision_cfg"]["reducer_cfg"].pop("selection")
        assert cfg == tcfg


def test_a_shipped_layout_with_adaptive_selection_trains() -> None:
    """``DRIP-ViT-Tiny-8-4x`` (conv stem, 64 patches, upsampling off) as shipped, its count
    following content, through open_clip: forward, backward, eval after calibration."""
    cfg = copy.deepcopy(get_model_config("DRIP-ViT-Tiny-8-4x"))
    assert cfg["vision_cfg"]["reducer_cfg"]["selection"] == "adaptive"  # the shipped default
    cfg.pop("flops_target")
    name = "test-DRIP-ViT-Tiny-8-4x-adaptive"
    register_config(name, cfg)
    try:
        torch.manual_seed(0)
        model = open_clip.create_model(name, output_dict=True)
    finally:
        registry._REGISTERED.pop(name, None)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    images = rectangles(14, size=64)[0]
    texts = torch.randint(1, 49407, (14, model.context_length))
    with record_forward() as rec:
        out = model(images, texts)
    counts = (rec[0].groups[:, -1] + 1).float()
    assert counts.mean().item() == pytest.approx(expected_segments(64, 0.25), rel=0.05) and counts.std() > 0
    loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    (loss + rec[0].aux_losses["boundary_loss"]).backward()
    assert trunks(model)[0].reducer.boundary_predictor.q.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(images)).all()
    assert registry.get_reducer_cfg("DRIPTopK-ViT-Tiny-8-4x")["selection"] == "topk"  # the fixed count, named


def _calibrate_on_rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trunk = small_trunk()
        trunk.train()
        for step in range(3):  # each rank its own images, as data parallelism gives it
            run(trunk, rectangles(14, seed=1000 * rank + step)[0])
        torch.save(predictor(trunk).state_dict(), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_ranks_keep_one_calibrated_threshold(tmp_path) -> None:
    """Each rank sees other images; the calibration averages their batch thresholds, so every rank
    (and the checkpoint rank 0 writes) cuts an evaluation image the same way."""
    from dtp_ds.cluster.ports import free_port

    out = str(tmp_path / "pred")
    torch.multiprocessing.spawn(_calibrate_on_rank, args=(free_port(), out), nprocs=2, join=True)
    states = [torch.load(f"{out}.{r}") for r in range(2)]
    assert torch.equal(states[0]["threshold"], states[1]["threshold"])
    assert int(states[0]["calibration_steps"]) == 3
    # one process fed rank 1's batches alone ends elsewhere: the ranks' batches did differ
    alone = small_trunk()
    alone.train()
    for step in range(3):
        run(alone, rectangles(14, seed=1000 + step)[0])
    assert not torch.equal(predictor(alone).threshold, states[1]["threshold"])
