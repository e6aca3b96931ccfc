"""The reducers beside DRIP: ToMe's merging and proportional attention, FLIP patch dropout and its
unmasked final segment, TokenLearner, grouping layers (local 3x3-window soft k-means, then dense),
DynamicViT (masked and dropping). (Every registered name's forward + backward: ``test_models.py``.)"""
from __future__ import annotations

import open_clip
import pytest
import torch

import dtp_ds  # noqa: F401
from dtp_ds.models import VisionTransformer, make_reducer, record_forward, trunks
from dtp_ds.models.reducers.dropout import PatchDropoutReducer
from dtp_ds.models.reducers.grouping import GroupingLayer
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


GROUPING = {"type": "grouping", "local_at": [2], "stride": 2, "dense_at": 4, "tokens": 8, "iters": 2}


def test_grouping_runs_the_token_counts_it_plans_and_evaluates_deterministically():
    model = trunk(GROUPING).eval()
    planned = model.reducer.planned_tokens(64, 6)
    assert planned == [65.0, 65.0, 17.0, 17.0, 9.0, 9.0]  # 8x8 patches -> 4x4 centroids -> 8 groups
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = model.forward_with_aux(images), model.forward_with_aux(images)
    assert a.token_counts.tolist() == planned and torch.equal(a.features, b.features)
    assert torch.equal(a.groups, b.groups)
    assert a.stats["compression"].item() == 8.0 and not a.stats["compression"].requires_grad
    # every patch ended in one of the 8 final groups, following the hard assignments layer by layer
    assert a.groups.shape == (3, 64) and a.groups.dtype == torch.long
    assert a.groups.min() >= 0 and a.groups.max() < 8
    local, dense = a.extras["assignments"]
    assert local.shape == (3, 64, 16) and dense.shape == (3, 16, 8)
    assert torch.equal(a.groups, dense.argmax(-1).gather(1, local.argmax(-1)))
    plan = model.reducer.plan(64, 6, 64)
    assert plan.tokens == tuple(planned) and plan.padded == (None,) * 6 and plan.reducer_bytes > 0
    # local only, two layers: 8x8 -> 4x4 -> 2x2
    assert trunk({"type": "grouping", "local_at": [1, 3], "dense_at": None}).reducer.planned_tokens(64, 6) == \
        [65.0, 17.0, 17.0, 5.0, 5.0, 5.0]


def test_grouping_refuses_what_it_cannot_run():
    for cfg, match in [({"local_at": [6]}, "inside the trunk"), ({"local_at": [3, 2]}, "strictly increasing"),
                       ({"local_at": [3], "dense_at": 2}, "dense layer is last"),
                       ({"local_at": [1, 2, 3, 4]}, "divided by stride 2 4 times"),
                       ({"tokens": 65}, "tokens=65"), ({"iters": 0}, "iters=0"),
                       ({"local_at": [], "dense_at": None}, "at least one")]:
        with pytest.raises(ValueError, match=match):
            make_reducer({**GROUPING, **cfg}, 64, 6, 64)
    with pytest.raises(ValueError, match="square patch grid"):
        make_reducer(GROUPING, 64, 6, 48)
    with pytest.raises(ValueError, match="8x8 patch grid"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=2,
                          reducer=make_reducer(GROUPING, 64, 6, 64))


def test_local_grouping_assigns_each_token_only_within_its_3x3_window():
    """The unfold/fold windowing against a direct dense computation on a non-square grid: a token's
    weight on a centroid outside the 3x3 centroid cells around its own cell is exactly zero."""
    torch.manual_seed(0)
    layer = GroupingLayer(16, iters=3, stride=2)
    (h, w), s = (8, 12), 2
    x = torch.randn(2, h * w, 16)
    out, grid, hard, soft = layer(x, (h, w))
    assert grid == (4, 6) and out.shape == (2, 24, 16) and soft.shape == (2, 96, 24)
    ty, tx = torch.arange(h).repeat_interleave(w) // s, torch.arange(w).repeat(h) // s
    cy, cx = torch.arange(4).repeat_interleave(6), torch.arange(6).repeat(4)
    near = ((ty[:, None] - cy).abs() <= 1) & ((tx[:, None] - cx).abs() <= 1)  # (96 tokens, 24 centroids)
    assert torch.all(soft[:, ~near] == 0) and torch.all(soft[:, near] > 0)
    assert torch.allclose(soft.sum(-1), torch.ones(2, 96), atol=1e-5)
    assert torch.equal(hard, soft.argmax(-1)) and near.gather(1, hard[0][:, None]).all()
    # the same layer computed densely, masking the window
    xn = layer.norm(x)
    c = layer.init(xn.transpose(1, 2).reshape(2, 16, h, w)).flatten(2).transpose(1, 2)
    k, v = layer.to_kv(xn).chunk(2, dim=-1)
    for _ in range(layer.iters):
        q = layer.to_q(layer.norm_c(c))
        a = (k @ q.transpose(1, 2) * layer.scale).masked_fill(~near, float("-inf")).softmax(-1)
        mass = a.sum(1).unsqueeze(-1)
        c, residual = a.transpose(1, 2) @ v / mass, a.transpose(1, 2) @ x / mass
    assert torch.allclose(soft, a, atol=1e-5)
    assert torch.allclose(out, residual + layer.proj(c), atol=1e-5)


def test_grouping_trains_every_parameter_also_under_activation_checkpointing():
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model = trunk(GROUPING)
        model.set_grad_checkpointing(ckpt)
        model(images).square().sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_reducers_run_in_bf16_without_nan():
    images = torch.randn(2, 3, 64, 64)
    for cfg in ({"type": "tome", "r": [16, 12, 8, 4, 2, 0]}, {"type": "patch_dropout", "prob": 0.5},
                {"type": "tokenlearner", "at": 2, "tokens": 8}, GROUPING, {"type": "dynamicvit"},
                {"type": "dynamicvit_drop"}):
        model = trunk(cfg).to(torch.bfloat16)
        out = model(images.to(torch.bfloat16))
        out.float().square().sum().backward()
        assert torch.isfinite(out.float()).all(), cfg
        assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None), cfg


@pytest.mark.parametrize("name", ["ToMe-ViT-Tiny-8", "PatchDrop-ViT-Tiny-8", "TokenLearner-ViT-Tiny-8",
                                  "Grouping-ViT-Tiny-8", "DynamicViT-ViT-Tiny-8", "DynamicViTDrop-ViT-Tiny-8"])
def test_the_tiny_configs_build_and_report(name):
    model = open_clip.create_model(name, output_dict=True)
    (t,) = trunks(model)
    with record_forward() as rec:
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 32, dtype=torch.long))
    # training runs what the memory model plans (DynamicViT: every token; the others: planned_tokens)
    assert rec[0].token_counts.tolist() == list(t.reducer.plan(t.num_patches, t.depth, t.embed_dim).tokens)
    if not name.startswith("DynamicViT-"):
        assert rec[0].token_counts.tolist() == t.reducer.planned_tokens(t.num_patches, t.depth)


# --- DynamicViT -------------------------------------------------------------------------------

DVIT = {"type": "dynamicvit", "rho": 0.5, "stages": [1, 2, 3]}
DVIT_DROP = {**DVIT, "type": "dynamicvit_drop"}


@pytest.mark.parametrize("cfg", [DVIT, DVIT_DROP])
def test_dynamicvit_evaluates_the_tokens_it_plans_deterministically(cfg):
    model = trunk(cfg)
    planned = model.reducer.planned_tokens(64, 6)
    assert planned == [65.0, 33.0, 17.0, 9.0, 9.0, 9.0]  # CLS + floor(0.5 ** s * 64) from stage s on
    images = torch.randn(4, 3, 64, 64)
    train = model.forward_with_aux(images).token_counts.tolist()
    # dynamicvit trains on every token (attention masked); the drop variant trains at the evaluation counts
    assert train == ([65.0] * 6 if cfg is DVIT else planned) == list(model.reducer.plan(64, 6, 64).tokens)
    model.eval()
    with torch.no_grad():
        a, b = model.forward_with_aux(images), model.forward_with_aux(images)
    assert a.token_counts.tolist() == planned and torch.equal(a.features, b.features)
    pos = a.extras["kept_positions"]
    assert pos.shape == (4, 8) and torch.equal(pos, pos.sort(dim=1).values)
    assert torch.equal(pos, b.extras["kept_positions"])
    assert a.stats["compression"].item() == 8.0 and a.aux_losses == {}


@pytest.mark.parametrize("cfg", [DVIT, DVIT_DROP])
def test_dynamicvit_every_parameter_gets_a_gradient_in_training(cfg):
    model = trunk(cfg)
    out = model.forward_with_aux(torch.randn(4, 3, 64, 64))
    assert set(out.aux_losses) == ({"ratio_loss"} if cfg is DVIT else set())  # no teacher: no distillation
    (out.features.square().mean() + sum(out.aux_losses.values())).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or not p.grad.abs().sum() > 0]
    assert not bad, bad
    # the predictors learn through the task loss alone too (masked attention / straight-through keep values)
    model.zero_grad()
    model.forward_with_aux(torch.randn(4, 3, 64, 64)).features.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.reducer.predictors.parameters())


def test_policy_attention_gives_dropped_tokens_no_attention_but_the_policy_a_gradient():
    from dtp_ds.models.vit import policy_weights

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    keep = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    w = policy_weights(q, k, keep)
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, 5), atol=1e-5)
    off_diag = ~torch.eye(5, dtype=torch.bool)
    dropped = (keep == 0)[:, None, None, :] & off_diag
    assert torch.all(w.masked_select(dropped.expand_as(w)) == 0)  # nobody attends to a dropped token ...
    assert torch.all(w.diagonal(dim1=-2, dim2=-1) > 0)  # ... it still attends to itself
    (grad,) = torch.autograd.grad((w[:, :, 0] * torch.arange(5.0)).sum(), keep)  # CLS's attention, weighed
    assert torch.isfinite(grad).all() and torch.all(grad[keep == 0] != 0)  # dropped tokens' keep values learn
    # an all-ones policy is plain attention; a dropped token's content does not reach the others
    attn = Attention(8, 2)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(attn(x, key_gate=torch.ones(2, 5)), attn(x), atol=1e-5)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]).expand(2, -1)
    y = x.clone()
    y[:, 2] += 3.0
    a, b = attn(x, key_gate=mask), attn(y, key_gate=mask)
    assert torch.allclose(a[:, [0, 1, 3, 4]], b[:, [0, 1, 3, 4]], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])


def _export_trunk(model: VisionTransformer, path) -> None:
    """Save a trunk as tools/export_checkpoint lays out a CLIP model's image tower."""
    from safetensors.torch import save_file

    save_file({f"visual.trunk.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(path))


@pytest.mark.parametrize("cfg", [DVIT, DVIT_DROP])
def test_dynamicvit_distils_from_a_teacher_loaded_from_a_file_and_kept_out_of_the_model(cfg, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    _export_trunk(trunk({"type": "none"}), tmp_path / "plain.safetensors")
    images = torch.randn(2, 3, 64, 64)
    # teacher = the student's own trunk, every token kept (rho 1; dynamicvit: predictors sure to keep)
    student = trunk({**cfg, "rho": 1.0, "teacher": str(tmp_path / "self.safetensors")})
    _export_trunk(student, tmp_path / "self.safetensors")
    for pred in student.reducer.predictors:
        torch.nn.init.zeros_(pred.out_conv[-1].weight)
        pred.out_conv[-1].bias.data = torch.tensor([30.0, -30.0])
    out = student.forward_with_aux(images)
    assert out.aux_losses["distill_loss"].item() < 1e-8
    teacher = student.reducer.teacher()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not [k for k in student.state_dict() if "teacher" in k]
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in student.parameters())
    # another teacher (a plain trunk of another seed): a loss with a gradient; its forward is counted
    student = trunk({**cfg, "teacher": str(tmp_path / "plain.safetensors")})
    counter = FlopCounterMode(display=False)
    with counter:
        out = student.forward_with_aux(images)
    loss = out.aux_losses["distill_loss"]
    assert loss.item() > 1e-3 and loss.requires_grad
    loss.backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    alone = FlopCounterMode(display=False)
    with alone:
        trunk(cfg).forward_with_aux(images)
    assert counter.get_total_flops() > alone.get_total_flops() * 1.3  # the teacher's full forward ran
    student.eval()
    with torch.no_grad():
        assert student.forward_with_aux(images).aux_losses == {}  # evaluation: no teacher
    with pytest.raises(ValueError, match="export a checkpoint first"):
        trunk({**cfg, "teacher": str(tmp_path)}).forward_with_aux(images)
    with pytest.raises(FileNotFoundError):
        trunk({**cfg, "teacher": str(tmp_path / "missing.safetensors")}).forward_with_aux(images)


def test_dynamicvit_ratio_loss_pulls_the_policy_to_its_targets():
    model = trunk(DVIT)
    for pred in model.reducer.predictors:  # keep everything: every stage's policy mean is 1
        torch.nn.init.zeros_(pred.out_conv[-1].weight)
        pred.out_conv[-1].bias.data = torch.tensor([30.0, -30.0])
    out = model.forward_with_aux(torch.randn(2, 3, 64, 64))
    expected = 2.0 * sum((1 - 0.5 ** s) ** 2 for s in (1, 2, 3)) / 3
    assert out.aux_losses["ratio_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out.stats["keep_ratio"].item() == 1.0
    with pytest.raises(ValueError, match="increasing block boundaries"):
        trunk({"type": "dynamicvit", "stages": [3, 2]})


@pytest.mark.parametrize("cfg", [DVIT, DVIT_DROP])
def test_dynamicvit_under_activation_checkpointing_gives_the_same_gradients(cfg):
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model = trunk(cfg)  # seeds: the same Gumbel draws in both
        model.set_grad_checkpointing(ckpt)
        out = model.forward_with_aux(images)
        (out.features.square().sum() + sum(out.aux_losses.values())).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_a_reducer_without_planned_tokens_is_refused_when_defined():
    """planned_tokens is required: FLOP counts and the memory model read it, and a forgotten one
    used to mean "no reduction" without a word."""
    from dtp_ds.models.protocol import TokenReducer

    with pytest.raises(TypeError, match="must define planned_tokens"):
        class Forgetful(TokenReducer):
            def at_boundary(self, index, x, st):
                return x[:, :2]

    class Subclassed(type(make_reducer({"type": "tome", "r": 2}, 32, 2, 16))):  # inherits ToMe's: accepted
        pass

    assert Subclassed.planned_tokens is not TokenReducer.planned_tokens


def test_a_reducer_reports_exactly_the_statistics_it_declares():
    """stat_names is enforced at the first forward: a statistic the class does not declare, or
    (in training) a declared one left out, is refused naming the reducer, the name and the fix."""
    from dtp_ds.models.protocol import TokenReducer

    class Chatty(TokenReducer):
        stat_names = ("compression",)
        say = ("compression", "purity")

        def on_input(self, x, st):
            for name in self.say:
                st.stats[name] = torch.tensor(1.0)
            return x

        def planned_tokens(self, patches, depth, rate=None):
            return [patches + 1.0] * depth

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reducer=Chatty())
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"reducer \(.*Chatty\) reported statistic\(s\) \['purity'\].*add them to "
                                         r".*Chatty.stat_names"):
        model(images)
    Chatty.say = ()
    with pytest.raises(ValueError, match=r"declares statistic\(s\) \['compression'\].*report each in every training "
                                         r"forward.*or remove it from .*Chatty.stat_names"):
        model(images)
    with torch.no_grad():
        model.eval()(images)  # evaluation may leave a declared statistic out
    Chatty.say = ("compression",)
    model.train()(images)
    with pytest.raises(TypeError, match="stat_names must be a tuple"):
        class Misdeclared(TokenReducer):
            stat_names = "compression"

            def planned_tokens(self, patches, depth, rate=None):
                return [patches + 1.0] * depth
