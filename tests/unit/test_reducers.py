"""The reducers beside DRIP: ToMe's merging and proportional attention, FLIP patch dropout and its
unmasked final segment. (Every registered name's forward + backward: ``test_models.py``.)"""
from __future__ import annotations

import open_clip
import pytest
import torch

import dtp_ds  # noqa: F401
from dtp_ds.models import VisionTransformer, make_reducer, record_forward, trunks
from dtp_ds.models.reducers.dropout import PatchDropoutReducer
from dtp_ds.models.reducers.tome import bipartite_merge, mergeable
from dtp_ds.models.vit import Attention
from dtp_ds.train.checkpoint import TrainState


def trunk(reducer_cfg: dict, depth: int = 6) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=depth, num_heads=2, num_classes=32,
                             reducer=make_reducer(reducer_cfg, 64, depth, 64))


def test_bipartite_merge_keeps_cls_first_and_every_patch_counted():
    torch.manual_seed(0)
    x, metric = torch.randn(3, 17, 8), torch.randn(3, 17, 4)
    x[:, 0] = 7.0  # CLS
    out, sizes = bipartite_merge(x, torch.ones(3, 17), metric, mergeable(17, 5))
    assert out.shape == (3, 12, 8) and torch.all(out[:, 0] == 7.0)
    assert torch.equal(sizes.sum(1), torch.full((3,), 17.0)) and torch.all(sizes[:, 0] == 1)
    assert mergeable(17, 100) == 8 and mergeable(2, 1) == 0  # |A| - 1 (CLS kept) and |B| bound it


def test_a_merged_token_attends_as_the_tokens_it_stands_for():
    """Proportional attention: a token of size 2 weighs as its two identical copies did."""
    torch.manual_seed(0)
    attn = Attention(8, 2)
    a, b, c = torch.randn(3, 1, 1, 8).unbind(0)
    full = attn(torch.cat([c, a, a, b], dim=1))
    merged = attn(torch.cat([c, a, b], dim=1), key_bias=torch.tensor([[1.0, 2.0, 1.0]]).log())
    assert torch.allclose(full[:, [0, 1, 3]], merged, atol=1e-6)


def test_tome_runs_the_token_counts_it_plans_and_evaluates_deterministically():
    model = trunk({"type": "tome", "r": [16, 12, 8, 4, 2, 0]}).eval()
    planned = model.reducer.planned_tokens(64, 6)
    assert planned == [65.0, 49.0, 37.0, 29.0, 25.0, 23.0]
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_with_aux(images), model.forward_with_aux(images)
    assert a.token_counts.tolist() == planned and torch.equal(a.features, b.features)
    assert a.stats["compression"].item() == pytest.approx(64 / 22)
    # a constant r halves the sequence each block until a CLS and a patch or two are left
    assert trunk({"type": "tome", "r": 40}).reducer.planned_tokens(64, 6) == [65.0, 33.0, 17.0, 9.0, 5.0, 3.0]
    with pytest.raises(ValueError, match="one per block"):
        trunk({"type": "tome", "r": [1, 2]})


def test_tome_under_activation_checkpointing_gives_the_same_gradients():
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model = trunk({"type": "tome", "r": [16, 12, 8, 4, 2, 0]})
        model.set_grad_checkpointing(ckpt)
        model(images).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_patch_dropout_drops_in_training_only_and_keeps_order():
    model = trunk({"type": "patch_dropout", "prob": 0.75})
    images = torch.randn(2, 3, 64, 64)
    out = model.forward_with_aux(images)
    assert out.token_counts.tolist() == [17.0] * 6 == model.reducer.planned_tokens(64, 6)
    assert out.stats["compression"].item() == pytest.approx(4.0)
    model.eval()
    with torch.no_grad():
        assert model.forward_with_aux(images).token_counts.tolist() == [65.0] * 6


def test_patch_dropout_ends_with_an_unmasked_segment_that_survives_a_resume():
    reducer = make_reducer({"type": "patch_dropout", "prob": 0.5, "final_unmasked": 0.25}, 64, 6, 64)
    sched = reducer.schedule(100)
    state = TrainState()
    for step in range(1, 101):
        state.step = step
        sched.step(state)
        assert reducer.drop.prob == (0.0 if step >= 75 else 0.5), step
    fresh = make_reducer({"type": "patch_dropout", "prob": 0.5, "final_unmasked": 0.25}, 64, 6, 64)
    fresh.schedule(100).load_state_dict(sched.state_dict())
    assert fresh.drop.prob == 0.0
    assert isinstance(reducer, PatchDropoutReducer) and make_reducer(
        {"type": "patch_dropout", "prob": 0.5}, 64, 6, 64).schedule(100) is None


def test_tokenlearner_learns_its_tokens_before_its_block():
    model = trunk({"type": "tokenlearner", "at": 2, "tokens": 8}).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_with_aux(images)
    assert out.token_counts.tolist() == [65.0, 65.0, 9.0, 9.0, 9.0, 9.0] == model.reducer.planned_tokens(64, 6)
    assert out.stats["compression"].item() == 8.0
    with pytest.raises(ValueError, match="block boundary inside the trunk"):
        trunk({"type": "tokenlearner", "at": 6})


def test_reducers_run_in_bf16_without_nan():
    images = torch.randn(2, 3, 64, 64)
    for cfg in ({"type": "tome", "r": [16, 12, 8, 4, 2, 0]}, {"type": "patch_dropout", "prob": 0.5},
                {"type": "tokenlearner", "at": 2, "tokens": 8}):
        model = trunk(cfg).to(torch.bfloat16)
        out = model(images.to(torch.bfloat16))
        out.float().square().sum().backward()
        assert torch.isfinite(out.float()).all(), cfg
        assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None), cfg


@pytest.mark.parametrize("name", ["ToMe-ViT-Tiny-8", "PatchDrop-ViT-Tiny-8", "TokenLearner-ViT-Tiny-8"])
def test_the_tiny_configs_build_and_report(name):
    model = open_clip.create_model(name, output_dict=True)
    (t,) = trunks(model)
    with record_forward() as rec:
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 32, dtype=torch.long))
    assert rec[0].token_counts.tolist() == t.reducer.planned_tokens(t.num_patches, t.depth)
