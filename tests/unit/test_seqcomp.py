"""Seqcomp of the image trunk's input (token dropout, patch scaling), its schedule
(``--seqcomp-schedule``) and the LR schedulers (``--lr-scheduler``)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

import dtp_ds  # noqa: F401
from dtp_ds.eval.flops import torch_macs
from dtp_ds.models import VisionTransformer, make_reducer, trunks
from dtp_ds.models.seqcomp import NONE, SeqComp, image_tower_cost, keep_count, pi_resize_kernel
from dtp_ds.train.args import ConfigError, ModelConfig, parse_args
from dtp_ds.train.schedule import WarmupDecay, before_resume, check_resumed_lr, warmup_decay_lr
from dtp_ds.train.seqcomp_schedule import SeqCompSchedule, load_schedule, parse_spec


def trunk(reducer_cfg: dict | None = None, stem: str = "patch", depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=16,
                             stem=stem, reducer=make_reducer(reducer_cfg, 32, depth, 64))


IMAGES = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("strategy", [NONE, SeqComp(0.0, 8)])
def test_the_identity_strategy_is_bit_identical(strategy):
    model = trunk()
    torch.manual_seed(5)
    ref = model(IMAGES)
    model.set_seqcomp(strategy)
    torch.manual_seed(5)
    assert torch.equal(model(IMAGES), ref)


def test_evaluation_ignores_the_strategy():
    model = trunk().eval()
    with torch.no_grad():
        ref = model(IMAGES)
        model.set_seqcomp(SeqComp(0.75, 16))
        out = model.forward_with_aux(IMAGES)
    assert torch.equal(out.features, ref) and out.token_counts.tolist() == [65.0] * 4


def test_token_dropout_keeps_cls_and_sorted_distinct_subsets_reproducibly():
    model = trunk()
    model.set_seqcomp(SeqComp(0.5))
    torch.manual_seed(3)
    x, embed, kept = model._embed(IMAGES)
    torch.manual_seed(3)
    _, _, again = model._embed(IMAGES)
    assert kept.shape == (3, 32) and x.shape == (3, 33, 32) and embed.shape == (3, 32, 32)
    assert torch.equal(kept, again)
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # ascending: raster order, no repeats
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
    cls = model.cls_token.expand(3, -1, -1)
    full = model.norm_pre(torch.cat([cls, model.patch_embed(IMAGES)], 1) + model.pos_embed)
    assert torch.allclose(x[:, 0], full[:, 0])  # CLS kept, with its position
    for b in range(3):  # each kept token is its own patch with its own position embedding
        assert torch.allclose(x[b, 1:], full[b, 1 + kept[b]], atol=1e-6)
    assert keep_count(64, 0.5) == 32 and keep_count(10, 0.9) == 1 and keep_count(3, 0.99) == 1
    assert model.forward_with_aux(IMAGES).token_counts.tolist() == [33.0] * 4


def test_dropped_pixels_get_no_gradient():
    model = trunk()
    model.set_seqcomp(SeqComp(0.75))
    images = IMAGES.clone().requires_grad_(True)
    torch.manual_seed(0)
    x, _, kept = model._embed(images)
    (x * torch.randn_like(x)).sum().backward()  # (a plain sum of LayerNorm'd tokens has ~0 gradient)
    got = images.grad.abs().sum(1)  # (B, 64, 64)
    patch_grad = got.view(3, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(3, 64, 64).sum(-1)  # (B, patches)
    for b in range(3):
        mask = torch.zeros(64, dtype=torch.bool)
        mask[kept[b]] = True
        assert torch.all(patch_grad[b, ~mask] == 0) and torch.all(patch_grad[b, mask] > 0)


def test_pi_resize_keeps_inner_products_and_the_stored_kernel():
    """FlexiViT's property on a trunk's stored (fp32) kernel: <x, w> == <resize(x), PI-resize(w)>
    for patches x upsampled to the new size (timm works in fp32: equal to fp32 rounding)."""
    w = trunk().patch_embed.weight.detach()
    stored = w.clone()
    for new in (12, 16):
        w_new = pi_resize_kernel(w, new)
        x = torch.randn(7, 3, 8, 8)
        up = F.interpolate(x, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
        ref, got = torch.einsum("nchw,dchw->nd", x, w), torch.einsum("nchw,dchw->nd", up, w_new)
        assert (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
    assert torch.equal(w, stored)


def test_patch_scaling_resamples_positions_reaches_the_stored_kernel_and_leaves_it():
    model = trunk()
    stored = model.patch_embed.weight.detach().clone()
    model.set_seqcomp(SeqComp(0.0, 16))
    out = model.forward_with_aux(IMAGES)
    assert out.token_counts.tolist() == [17.0] * 4  # 4x4 grid + CLS
    out.features.square().sum().backward()
    assert model.patch_embed.weight.grad is not None and model.patch_embed.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0
    assert torch.equal(model.patch_embed.weight.detach(), stored)
    # a patch that does not divide the image: the image is resized to floor(64 / 12) * 12 = 60 px
    model.set_seqcomp(SeqComp(0.5, 12))
    assert model.forward_with_aux(IMAGES).token_counts.tolist() == [13.0] * 4  # 5x5 grid, keep 12


def test_the_conv_stem_refuses_patch_scaling_but_drops_tokens():
    model = trunk(stem="conv")
    with pytest.raises(ValueError, match="conv stem"):
        model.set_seqcomp(SeqComp(0.0, 16))
    model.set_seqcomp(SeqComp(0.5))
    assert model.forward_with_aux(IMAGES).token_counts.tolist() == [33.0] * 4


@pytest.mark.parametrize("cfg", [
    {"type": "drip", "pre": 1, "shorten": 3, "post": 0, "compression": 4, "predictor": "cosine",
     "predictor_input": "embed", "selection": "topk", "tied": True},
    {"type": "tome", "r": 4},
    {"type": "tokenlearner", "at": 2, "tokens": 8},
    {"type": "dynamicvit", "rho": 0.7, "stages": [1, 2]},
    {"type": "dynamicvit_drop", "rho": 0.7, "stages": [1, 2]},
    {"type": "patch_dropout", "prob": 0.5},
])
@pytest.mark.parametrize("strategy", [SeqComp(0.5), SeqComp(0.25, 16)])
def test_every_reducer_trains_on_a_seqcomp_input(cfg, strategy):
    model = trunk(cfg)
    model.set_seqcomp(strategy)
    out = model.forward_with_aux(IMAGES)
    loss = out.features.square().sum() + sum(out.aux_losses.values())
    loss.backward()
    assert torch.isfinite(loss) and out.token_counts[0] <= 1 + keep_count(64 if strategy.patch is None else 16,
                                                                         strategy.rate)


def test_grouping_refuses_token_dropout_naming_itself():
    model = trunk({"type": "grouping", "local_at": [1], "stride": 2, "dense_at": 2, "tokens": 4})
    with pytest.raises(ValueError, match="grouping reducer.*token dropout"):
        model.set_seqcomp(SeqComp(0.5))
    model.set_seqcomp(SeqComp(0.0, 16))  # a 4x4 grid still halves once
    model.forward_with_aux(IMAGES).features.sum().backward()
    with pytest.raises(ValueError, match="grouping reducer.*not square or not divisible"):
        model.set_seqcomp(SeqComp(0.0, 12))


def test_image_tower_flops_fall_with_r_and_p_and_the_text_towers_do_not():
    model = open_clip.create_model("PatchStem-ViT-Tiny-8")
    (t,) = trunks(model)
    model.train()

    def macs(strategy):
        t.set_seqcomp(strategy)
        return torch_macs(model.visual, (IMAGES,)), torch_macs(model.transformer, (torch.randn(3, 32, 128),))

    base, rate, patch = macs(NONE), macs(SeqComp(0.5)), macs(SeqComp(0.0, 16))
    assert rate[0] < 0.6 * base[0] and patch[0] < 0.35 * base[0]
    assert base[1] == rate[1] == patch[1] > 0
    # the per-sample estimate the cost units use is close to the count (which also holds, at a
    # batch of 3, the once-per-batch PI-resize of the kernel)
    assert image_tower_cost(t, SeqComp(0.5)) == pytest.approx(rate[0] / base[0], rel=0.05)
    assert image_tower_cost(t, SeqComp(0.0, 16)) == pytest.approx(patch[0] / base[0], rel=0.1)


def test_spec_and_file_forms_with_a_final_full_sequence_segment(tmp_path):
    segs = parse_spec("0.5:r=0.5,p=16;0.3:r=0.25")
    assert [s.fraction for s in segs] == pytest.approx([0.5, 0.3, 0.2]) and segs[-1].strategy == NONE
    assert [s.strategy for s in segs[:2]] == [SeqComp(0.5, 16), SeqComp(0.25)]
    assert parse_spec("1:r=0.5")[-1].strategy == SeqComp(0.5)  # sums to 1: ends under seqcomp, as written
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"segments": [{"fraction": 0.6, "r": 0.5, "cost": 0.4}], "ca_mse": {}}))
    got = load_schedule(str(f))
    assert got[0].cost == 0.4 and got[0].strategy == SeqComp(0.5) and got[1].strategy == NONE
    for bad, why in [("0.7:r=0.5;0.6:none", "sum to 1.3 > 1"), ("0.5:q=2", "unknown key 'q'"),
                     ("0.5:r=1.0", r"must be in \[0, 1\)"), ("0.5", "FRACTION:STRATEGY"),
                     ("-0.1:none", "must be > 0"), ("0.5:p=x", "is not KEY=NUMBER")]:
        with pytest.raises(ValueError, match=why):
            parse_spec(bad)


def test_the_old_flags_are_refused_with_the_new_names():
    for old, new in [("--compression-schedule", "--seqcomp-schedule"), ("--compression-costs", "--seqcomp-costs")]:
        with pytest.raises(ConfigError, match=f"{old} was renamed {new} .*: use {new}$"):
            parse_args(["--train-data", "x.tar", old, "0.5:r=0.5"])
    args = parse_args(["--train-data", "x.tar", "--seqcomp-schedule", "0.5:r=0.5"])
    assert args.model.seqcomp_schedule == "0.5:r=0.5"


def test_the_default_model_takes_every_schedule_in_every_task_and_the_old_name_is_refused():
    """The default --model is dtp_ds's trunk with the linear patch stem, in CLIP as in the
    image-only tasks, so token dropout and patch scaling both run; Plain-ViT-Tiny-8, its old
    name, is refused naming the new one wherever a name is resolved."""
    from dtp_ds.models import create_model, get_model_config, vision_tower

    default = ModelConfig().model
    spec = parse_spec("0.3:r=0.5,p=16;0.3:p=16;0.3:r=0.25")
    for built in (open_clip.create_model(default), vision_tower(default, 0)):
        SeqCompSchedule(spec, trunks(built), 10)  # checks every strategy on every trunk
    for resolve in (create_model, open_clip.create_model, get_model_config, lambda n: vision_tower(n, 0)):
        with pytest.raises(ValueError, match="model 'Plain-ViT-Tiny-8' was renamed PatchStem-ViT-Tiny-8: use "
                                             "PatchStem-ViT-Tiny-8"):
            resolve("Plain-ViT-Tiny-8")


def test_schedule_boundaries_costs_and_resume_at_any_step():
    model = trunk()
    segs = parse_spec("0.3:r=0.5;0.2:p=16,cost=0.5")
    sched = SeqCompSchedule(segs, [model], total_steps=10)
    assert sched.ends == [3, 5, 10]
    seen = []
    for step in range(1, 11):  # the Trainer: a step runs, is logged, then the schedule steps
        seen.append(model.seqcomp)
        row = sched.metrics(step)
        assert row["seqcomp_r"] == model.seqcomp.rate
        assert row["seqcomp_p"] == model.seqcomp.patch_or(8)
        sched.step(SimpleNamespace(step=step))
    assert seen == [SeqComp(0.5)] * 3 + [SeqComp(0.0, 16)] * 2 + [NONE] * 5
    r_cost = image_tower_cost(model, SeqComp(0.5))
    assert sched.cost_units(10) == pytest.approx(3 * r_cost + 2 * 0.5 + 5)
    assert sched.metrics(4)["cost_units"] == pytest.approx(3 * r_cost + 0.5)
    for k in range(11):  # resume after any step: same strategies and costs from there on
        a = SeqCompSchedule(segs, [trunk()], 10)
        a.step(SimpleNamespace(step=k))
        other = trunk()
        b = SeqCompSchedule(segs, [other], 10)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert other.seqcomp == a.trunks[0].seqcomp == seen[min(k, 9)]
        assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="resume with --seqcomp-schedule '0.3:r=0.5"):
        SeqCompSchedule(parse_spec("0.5:r=0.5"), [trunk()], 10).load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match="conv stem"):
        SeqCompSchedule(parse_spec("0.5:p=16"), [trunk(stem="conv")], 10)


def test_polynomial_and_constant_lr_against_closed_form_and_resume_checks():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warm, total = 4, 24
    poly = WarmupDecay(warm, total, 1, "poly", 2.0)
    for progress in (0.0, 0.5, 1.0):
        step = warm + int(progress * (total - warm))
        assert poly(step) == pytest.approx((1 - progress) ** 2)
    assert WarmupDecay(warm, total, 1, "poly", 3.0)(warm + 10) == pytest.approx(0.5 ** 3)
    assert WarmupDecay(warm, total, 1, "const")(20) == 1.0 and poly(1) == pytest.approx(2 / 4)
    assert WarmupDecay(warm, total, 1)(warm + 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    saved = warmup_decay_lr(opt, warm, total, 1, "poly", 2.0).state_dict()
    for kind, power, match in [("cosine", 2.0, "--lr-scheduler cosine differs.*resume with --lr-scheduler poly"),
                               ("poly", 3.0, "--lr-poly-power 3.0 differs.*resume with --lr-poly-power 2.0")]:
        sched = warmup_decay_lr(opt, warm, total, 1, kind, power)
        before_resume(sched)
        sched.load_state_dict(saved)
        with pytest.raises(ValueError, match=match):
            check_resumed_lr(sched, warm, 1, total, kind, power)
    sched = warmup_decay_lr(opt, warm, total, 1, "poly", 2.0)
    before_resume(sched)
    sched.load_state_dict(saved)
    assert check_resumed_lr(sched, warm, 1, total, "poly", 2.0) is None
    # a checkpoint from before --lr-scheduler (no kind saved) was cosine: a poly resume is refused
    legacy = {k: v for k, v in warmup_decay_lr(opt, warm, total, 1).state_dict().items()}
    legacy["lr_lambdas"] = [{"warmup": warm, "total_steps": total, "epochs": 1}]
    sched = warmup_decay_lr(opt, warm, total, 1, "poly", 2.0)
    before_resume(sched)
    sched.load_state_dict(legacy)
    with pytest.raises(ValueError, match="resume with --lr-scheduler cosine"):
        check_resumed_lr(sched, warm, 1, total, "poly", 2.0)


def test_a_resume_that_leaves_out_a_saved_schedule_is_refused():
    from dtp_ds.train.schedule import Schedules

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def step(self, state) -> None:
            self.n += 1

        def state_dict(self) -> dict:
            return {"n": self.n}

        def load_state_dict(self, state: dict) -> None:
            self.n = state["n"]

    saved = Schedules({"seqcomp": Counter(), "reducer0_patch_dropout": Counter()}).state_dict()
    with pytest.raises(ValueError, match=r"\['seqcomp'\].*same --seqcomp-schedule"):
        Schedules({"reducer0_patch_dropout": Counter()}).load_state_dict(saved)
    old = Schedules({"compression": Counter()}).state_dict()  # the key before the rename
    with pytest.raises(ValueError, match="schedule 'compression' was renamed 'seqcomp'"):
        Schedules({"seqcomp": Counter()}).load_state_dict(old)
    with pytest.raises(ValueError, match="no state for the schedules"):
        Schedules({"other": Counter()}).load_state_dict({})
