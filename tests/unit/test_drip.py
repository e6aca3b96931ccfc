"""DRIP encoder: segment pooling, boundaries, precision, invariances, checkpointing, training."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

import dtp_ds
from dtp_ds.models import (
    POOL_TYPES,
    VisionTransformer,
    boundary_rate_loss,
    expected_segments,
    pinned_tokens,
    record_forward,
    register_config,
    registry,
    trunks,
)
from dtp_ds.models.boundary import sample_boundaries
from dtp_ds.models.reducers.drip import DripReducer
from dtp_ds.models.segments import (
    from_padded,
    make_packing,
    pack_segments,
    segment_ids,
    straight_through_weights,
    to_padded,
    unpack_patches,
)

B32_FAMILY = [f"DRIP-ViT-B-32-{c}x{s}" for c in (2, 4, 10) for s in ("", "-up")]
TINY = ["DRIP-ViT-Tiny-8-4x", "DRIP-ViT-Tiny-8-4x-up"]
# DTP's MLP predictor as published, on the tiny layout (the shipped configs use the cosine router)
TINY_MLP = "DRIP-test-Tiny-8-4x-mlp"


@pytest.fixture(scope="module", autouse=True)
def tiny_mlp():
    cfg = registry.get_model_config("DRIP-ViT-Tiny-8-4x")
    drip = cfg["vision_cfg"]["reducer_cfg"]
    for key in ("predictor_input", "selection"):
        drip.pop(key)
    drip.update(predictor="mlp", predictor_hidden=192, temperature=0.5)
    register_config(TINY_MLP, cfg)
    yield
    registry._REGISTERED.pop(TINY_MLP, None)
    open_clip.factory._MODEL_CONFIGS.pop(TINY_MLP, None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are small, and on a shared 2-core machine two OpenMP
    threads competing with another process run several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_trunk(upsample: bool = False, pool: str = "mean_with_cls", **kw) -> VisionTransformer:
    """A 32 px, patch-4 (64 patches), width-32 trunk with DRIP blocks 1 (pre) + 2 (shorten)
    [+ 1 (post)]: fast enough for exhaustive checks."""
    post = 1 if upsample else 0
    reducer = DripReducer(dim=32, depth=3 + post, num_patches=64, pre=1, shorten=2, post=post, upsample=upsample,
                          compression=4)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3 + post, num_heads=2, num_classes=16,
                             global_pool=pool, reducer=reducer, **kw)


def predictor_of(model: nn.Module) -> nn.Module:
    """The boundary predictor of the (one) DRIP reducer inside ``model``."""
    return trunks(model)[0].reducer.boundary_predictor


def forward_aux(module: nn.Module, *inputs: torch.Tensor) -> tuple[object, dict[str, torch.Tensor]]:
    """``module(*inputs)`` and its trunk's auxiliary losses and statistics, as training reads them."""
    with record_forward() as rec:
        out = module(*inputs)
    (tower,) = rec
    return out, {**tower.aux_losses, **tower.stats}


def spread_predictor(trunk: VisionTransformer) -> None:
    """Make deterministic boundaries vary by token and sample (an untrained predictor sits at
    logit(prior) < 0 everywhere, which at eval means no boundary at all)."""
    with torch.no_grad():
        for fc in (predictor_of(trunk).fc1, predictor_of(trunk).fc2):
            fc.weight.normal_(0.0, 1.0)
        predictor_of(trunk).fc2.bias.zero_()


def clip_loss(model: nn.Module, out: dict[str, torch.Tensor]) -> torch.Tensor:
    return open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])


def tiny_batch(model: nn.Module, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.visual.image_size
    return torch.randn(n, 3, *size), torch.randint(1, 49407, (n, model.context_length))


# --- segments ----------------------------------------------------------------------------


def test_segment_ids_and_packing() -> None:
    hard = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    ids = segment_ids(hard)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 4, 5], [0] * 6, [0] * 6]
    packing = make_packing(ids)
    assert packing.counts.tolist() == [3, 6, 1, 1]
    assert packing.num_rows == 4 + 11 and packing.max_len == 7 and packing.padded
    assert packing.starts.tolist() == [0, 4, 11, 13]
    # Straight-through values that are 1 only up to rounding must still count as boundaries.
    assert segment_ids(torch.tensor([[0.99999994, 0.0, 1e-8]])).tolist() == [[0, 1, 1]]


def test_packed_pooling_matches_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 12, 5)  # CLS + 11 patches
    hard = (torch.rand(3, 11) < 0.3).float()
    packing = make_packing(segment_ids(hard))
    packed = pack_segments(x, packing)
    assert packed.shape == (packing.num_rows, 5)
    padded = to_padded(packed, packing)
    up = unpack_patches(packed, packing)
    for b in range(3):
        segments: list[list[int]] = [[]]
        for pos in range(11):
            segments[-1].append(pos)
            if hard[b, pos] and pos < 10:
                segments.append([])
        assert len(segments) == packing.counts[b]
        torch.testing.assert_close(padded[b, 0], x[b, 0])  # CLS kept
        for s, members in enumerate(segments):
            torch.testing.assert_close(padded[b, 1 + s], x[b, 1:][members].mean(0))
            for pos in members:
                torch.testing.assert_close(up[b, pos], padded[b, 1 + s])
        assert torch.all(padded[b, 1 + len(segments) :] == 0)  # padding
    assert torch.equal(from_padded(padded, packing), packed)


def dense_reference(x: torch.Tensor, boundaries: torch.Tensor, num: int) -> torch.Tensor:
    """Nawrot et al.'s L x S pooling matrix (dynamic-pooling ``common``/``final``, no upsample)."""
    hh1 = boundaries.cumsum(1) - boundaries
    foo = torch.arange(num, dtype=x.dtype).view(1, 1, num) - hh1.unsqueeze(-1)
    lel = torch.where(foo != 0, torch.zeros_like(foo), 1 - foo)
    lel = lel / (lel.sum(dim=1, keepdim=True) + 1e-9)
    return torch.einsum("bld,bls->bsd", x, lel)


def test_straight_through_pooling_matches_dense_reference() -> None:
    torch.manual_seed(0)
    # Probabilities k/8 keep ``hard + p - p`` exactly 0/1, as the dense reference compares floats.
    probs = (torch.randint(1, 8, (3, 13)).double() / 8).requires_grad_()
    x = torch.randn(3, 13, 4, dtype=torch.float64, requires_grad=True)
    hard = (probs > 0.5).double() + probs - probs.detach()
    packing = make_packing(segment_ids(hard))
    cls = torch.zeros(3, 1, 4, dtype=torch.float64)
    packed = pack_segments(torch.cat([cls, x], 1), packing, straight_through_weights(hard))
    ours = to_padded(packed, packing)[:, 1:]
    ref = dense_reference(x, hard, packing.max_len - 1)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    grads_ours = torch.autograd.grad((ours * g).sum(), (x, probs))
    grads_ref = torch.autograd.grad((ref * g).sum(), (x, probs))
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b)
    assert grads_ours[1].abs().sum() > 0  # the boundaries do receive gradient


# --- boundaries --------------------------------------------------------------------------


def test_boundary_loss_matches_binomial() -> None:
    hard = (torch.rand(5, 49) < 0.2).float().requires_grad_()
    prior = 0.1
    expected = -torch.distributions.Binomial(49, probs=torch.tensor(prior)).log_prob(hard.sum(-1)) / 49
    torch.testing.assert_close(boundary_rate_loss(hard, prior), expected.mean())
    boundary_rate_loss(hard, prior).backward()
    assert hard.grad is not None and torch.isfinite(hard.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_boundary_sampling_extreme_logits_fp16_bf16(dtype: torch.dtype, sign: float) -> None:
    logits = torch.full((2, 16), sign * 1e4, dtype=dtype, requires_grad=True)
    for stochastic in (True, False):
        probs, hard = sample_boundaries(logits, 0.5, stochastic)
        assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
        assert probs.min() >= 1e-4 and probs.max() <= 1 - 1e-4
        assert torch.all(hard == (1.0 if sign > 0 else 0.0))
        packing = make_packing(segment_ids(hard))
        x = torch.randn(2, 17, 8, dtype=dtype, requires_grad=True)
        pooled = pack_segments(x, packing, straight_through_weights(hard))
        loss = pooled.float().square().sum() + boundary_rate_loss(hard, 0.25)
        gx, gl = torch.autograd.grad(loss, (x, logits))
        assert pooled.dtype == dtype and torch.isfinite(pooled).all()
        assert torch.isfinite(gx).all() and torch.isfinite(gl).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [1e4, -1e4])
def test_trunk_in_low_precision_extreme_logits_no_nan(dtype: torch.dtype, bias: float) -> None:
    torch.manual_seed(0)
    trunk = small_trunk(upsample=True)
    with torch.no_grad():
        predictor_of(trunk).fc2.weight.zero_()
        predictor_of(trunk).fc2.bias.fill_(bias)
    trunk.to(dtype)  # as DeepSpeed does: every parameter in the low-precision dtype
    images = torch.randn(3, 3, 32, 32)  # fp32 images: the trunk casts them
    for train in (True, False):
        trunk.train(train)
        trunk.zero_grad()
        out, aux = forward_aux(trunk, images)
        (out.float().square().mean() + aux["boundary_loss"]).backward()
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert aux["boundary_rate"].item() == (1.0 if bias > 0 else 0.0)
        for name, p in trunk.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_predictor_runs_fp32_under_autocast() -> None:
    trunk = small_trunk()
    logits = {}
    predictor_of(trunk).register_forward_hook(lambda m, i, o: logits.update(out=o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trunk(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16  # the blocks did run in bf16
    assert logits["out"].logits.dtype == torch.float32 and logits["out"].probs.dtype == torch.float32


# --- forward semantics -------------------------------------------------------------------


def test_short_sequences_packed_attention_padded_to_batch_max() -> None:
    torch.manual_seed(0)
    trunk = small_trunk().eval()
    spread_predictor(trunk)
    images = torch.randn(6, 3, 32, 32)
    tokens, valid = trunk.forward_tokens_valid(images)
    lengths = valid.sum(1)
    assert lengths.min() < lengths.max() < 1 + trunk.num_patches
    assert tokens.shape[1] == lengths.max()  # padded to the batch's largest count, not L
    assert torch.all(tokens[~valid] == 0)
    # Token-wise layers of the shorten blocks see only real tokens: no compute on padding.
    rows = []
    first_short = trunk.blocks[1]
    hook = first_short.mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    trunk(images)
    hook.remove()
    assert rows == [int(lengths.sum())]


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("pool", POOL_TYPES)
def test_eval_batch_invariance_and_determinism(upsample: bool, pool: str) -> None:
    torch.manual_seed(0)
    trunk = small_trunk(upsample=upsample, pool=pool).eval()
    spread_predictor(trunk)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        batched = trunk(images)
        lengths = trunk.forward_tokens_valid(images)[1].sum(1)
        assert upsample or lengths.min() < lengths.max()  # padding is really exercised
        alone = torch.cat([trunk(images[i : i + 1]) for i in range(5)])
        again = trunk(images)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched, again)


def test_pinned_tokens_cut_exactly_that_many_segments() -> None:
    trunk = small_trunk().eval()  # 64 patches
    spread_predictor(trunk)
    for segments in (1, 7, 16, 63, 64):
        with pinned_tokens(trunk, segments):
            _, aux = forward_aux(trunk, torch.randn(3, 3, 32, 32))
            assert aux["compression"].item() == pytest.approx(64 / segments)
    assert predictor_of(trunk).forced_segments is None
    with pytest.raises(ValueError, match="segments must be in"), pinned_tokens(trunk, 65):
        trunk(torch.randn(1, 3, 32, 32))


def test_expected_segments_is_what_a_predictor_at_that_rate_makes() -> None:
    torch.manual_seed(0)
    for length, rate in ((49, 0.1), (64, 0.25), (196, 0.5)):
        hard = (torch.rand(20000, length) < rate).float()
        counts = make_packing(segment_ids(hard)).counts.float()
        assert counts.mean().item() == pytest.approx(expected_segments(length, rate), rel=0.01)


def test_record_forward_contents() -> None:
    plain = open_clip.create_model("ViT-Tiny-8", output_dict=True)
    with record_forward() as rec:
        plain(*tiny_batch(plain))
    assert rec == []  # open_clip's own tower: nothing to report
    model = open_clip.create_model("DRIP-ViT-Tiny-8-4x", output_dict=True)
    with record_forward() as rec:
        nn.ModuleDict({"wrapped": model})["wrapped"](*tiny_batch(model))  # reached inside wrappers too
        model.encode_image(tiny_batch(model)[0])
    assert len(rec) == 2  # one record per forward, in call order
    (tower, _), aux = rec, {**rec[0].aux_losses, **rec[0].stats}
    assert set(aux) == {"boundary_loss", "boundary_rate", "compression"}
    assert aux["boundary_loss"].requires_grad and aux["boundary_loss"].ndim == 0
    assert not aux["boundary_rate"].requires_grad and not aux["compression"].requires_grad
    assert 0.0 <= aux["boundary_rate"].item() <= 1.0 and aux["compression"].item() >= 1.0
    # per-block tokens: 2 full blocks, then the segments + CLS (compression = patches / segments)
    assert tower.token_counts.shape == (6,) and not tower.token_counts.requires_grad
    assert tower.token_counts[:2].tolist() == [65.0, 65.0]
    assert tower.token_counts[2].item() == pytest.approx(1 + 64 / aux["compression"].item())
    assert tower.groups.shape == (4, 64) and tower.scores.shape == (4, 64)
    model(*tiny_batch(model))  # outside record_forward: nothing is kept anywhere
    assert len(rec) == 2


# --- gradients ---------------------------------------------------------------------------


def _predictor_grad(model: nn.Module, use_clip: bool, use_boundary: bool) -> float:
    model.zero_grad()
    torch.manual_seed(1)
    out, aux = forward_aux(model, *tiny_batch(model))
    loss = torch.zeros(())
    if use_clip:
        loss = loss + clip_loss(model, out)
    if use_boundary:
        loss = loss + aux["boundary_loss"]
    loss.backward()
    pred = predictor_of(model)
    return sum(p.grad.abs().sum().item() for p in pred.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", [*TINY, TINY_MLP])
def test_tiny_every_parameter_gets_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True)
    assert _predictor_grad(model, use_clip=True, use_boundary=False) > 0  # straight-through path
    if name == TINY_MLP:  # DTP's predictor: its rate loss reaches it too (a top-k router has none)
        assert _predictor_grad(model, use_clip=False, use_boundary=True) > 0
    _predictor_grad(model, use_clip=True, use_boundary=True)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", B32_FAMILY)
def test_b32_family_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = dtp_ds.create_model(name, output_dict=True)
    images, text = torch.randn(2, 3, 224, 224), torch.randint(1, 49407, (2, 77))
    out, aux = forward_aux(model, images, text)
    assert out["image_features"].shape == (2, 512)
    loss = clip_loss(model, out) + aux["boundary_loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in predictor_of(model).parameters())


def test_deepspeed_style_bf16_params_fp32_images() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("DRIP-ViT-Tiny-8-4x-up", output_dict=True).to(torch.bfloat16)
    images, text = tiny_batch(model)
    out, aux = forward_aux(model, images, text)  # images stay fp32: the patch embedding casts them
    loss = clip_loss(model, out).float() + aux["boundary_loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- activation checkpointing ------------------------------------------------------------


def _run_seeded(trunk: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trunk.zero_grad()
    torch.manual_seed(123)  # same Gumbel noise both times
    out, aux = forward_aux(trunk, images)
    (out.square().mean() + aux["boundary_loss"]).backward()
    return out.detach(), {n: p.grad.clone() for n, p in trunk.named_parameters()}


def _saved_tensor_count(trunk: VisionTransformer, images: torch.Tensor) -> int:
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trunk(images)
    return count


@pytest.mark.parametrize("upsample", [False, True])
def test_checkpointing_same_outputs_and_grads(upsample: bool) -> None:
    torch.manual_seed(0)
    trunk = small_trunk(upsample=upsample, drop_path_rate=0.1).train()
    spread_predictor(trunk)
    images = torch.randn(4, 3, 32, 32)
    out_ref, grads_ref = _run_seeded(trunk, images)
    saved_ref = _saved_tensor_count(trunk, images)
    trunk.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _run_seeded(trunk, images)
    torch.testing.assert_close(out_ckpt, out_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], g, msg=name)
    # Every block checkpointed: each saves only its input instead of its internals.
    assert _saved_tensor_count(trunk, images) < saved_ref - 5 * len(trunk.blocks)


def test_clip_set_grad_checkpointing_reaches_trunk() -> None:
    model = open_clip.create_model("DRIP-ViT-Tiny-8-4x")
    model.set_grad_checkpointing(True)
    assert trunks(model)[0].grad_checkpointing


# --- other open_clip paths ---------------------------------------------------------------


def test_force_image_size_resamples_positions() -> None:
    model = open_clip.create_model("DRIP-ViT-Tiny-8-4x", force_image_size=96)
    assert trunks(model)[0].num_patches == 144
    assert model.encode_image(torch.randn(2, 3, 96, 96)).shape == (2, 128)


# --- training ----------------------------------------------------------------------------


MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32, "layers": 3, "width": 64, "patch_size": 4,
        "drip_cfg": {"pre": 1, "shorten": 2, "compression": 4},
    },
    "text_cfg": {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def micro_model_name():
    """A config registered at run time (as a checkpoint's would be), removed afterwards."""
    register_config("DRIP-test-micro", MICRO_CFG)
    yield "DRIP-test-micro"
    registry._REGISTERED.pop("DRIP-test-micro")
    open_clip.factory._MODEL_CONFIGS.pop("DRIP-test-micro")


def test_brief_training_reaches_prior_rate(micro_model_name: str) -> None:
    """From a predictor at rate 0.5, contrastive + boundary loss pull the rate to the prior 1/4."""
    torch.manual_seed(0)
    model = open_clip.create_model(micro_model_name, output_dict=True)
    pred = predictor_of(model)
    with torch.no_grad():
        pred.fc2.bias.zero_()
    images, text = torch.randn(64, 3, 32, 32), torch.randint(1, 1000, (64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rates = []
    for _ in range(150):
        idx = torch.randint(0, 64, (16,))
        out, aux = forward_aux(model, images[idx], text[idx])
        loss = clip_loss(model, out) + aux["boundary_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        rates.append(aux["boundary_rate"].item())
    assert rates[0] > 0.4
    rate = sum(rates[-30:]) / 30
    assert math.isclose(rate, pred.prior, rel_tol=0.15), rate


# --- tools -------------------------------------------------------------------------------


def test_flops_counts_drip_at_its_prior(capsys: pytest.CaptureFixture[str]) -> None:
    from dtp_ds.eval.flops import main, model_flops

    plain = model_flops("ViT-Tiny-8", whole_model=False)
    drip = model_flops("DRIPTopK-ViT-Tiny-8-4x", whole_model=False)
    # 64 patches at the prior 1/4: 63 / 4 + 1 = 16.75 segments expected; the fixed-count router
    # cuts every image into the rounded count, 17 (+ CLS)
    assert plain["tokens"] == 65 and drip["tokens"] == 18
    assert drip["compression"] == pytest.approx(64 / 17)
    assert 0.3 < drip["gflops"] / plain["gflops"] < 0.7
    assert drip["gflops"] >= drip["gflops_fvcore"]  # FlopCounterMode counts attention, fvcore does not
    # counted at that whole count, which lies above the count below it
    model = dtp_ds.create_model("DRIPTopK-ViT-Tiny-8-4x")
    size = (model.visual.image_size,) * 2 if isinstance(model.visual.image_size, int) else model.visual.image_size
    from dtp_ds.eval.flops import count_flops

    g16, g17 = (count_flops(model, size, segments=n)["gflops"] for n in (16, 17))
    assert g16 < drip["gflops"] and drip["gflops"] == pytest.approx(g17)
    # the shipped default (the count follows content) is planned at the prior's mean, 16.75 segments:
    # between the whole counts around it
    adaptive = model_flops("DRIP-ViT-Tiny-8-4x", whole_model=False)
    assert adaptive["tokens"] == pytest.approx(1 + 16.75) and g16 < adaptive["gflops"] < g17
    assert main(["--models", "DRIPTopK-ViT-Tiny-8-4x", "DRIP-ViT-Tiny-8-4x", "--image-only", "--boundary-rate", "0.5",
                 "--json"]) == 0
    fixed, mean = json.loads(capsys.readouterr().out)
    assert fixed["boundary_rate"] == mean["boundary_rate"] == 0.5
    assert fixed["tokens"] == 1 + round(0.5 * 63 + 1) and mean["tokens"] == pytest.approx(1 + 0.5 * 63 + 1)


def tiny_tower_macs(segments: int | None) -> int:
    """Multiply-adds of one 64 px image through an image tower, worked out by hand: ViT-Tiny-8
    (``segments=None``: open_clip's ViT, 8 px linear patches) or DRIP-ViT-Tiny-8-4x cutting its 64
    patches into ``segments`` segments after block 2 of 6 (width 192, MLP 768, CLIP width 128)."""
    d, mlp = 192, 768

    def block(t: int) -> int:  # qkv + out projection, QK^T and AV, the MLP
        return 4 * t * d * d + 2 * t * t * d + 2 * t * d * mlp

    head = d * 128
    if segments is None:
        return 64 * (3 * 8 * 8) * d + 6 * block(65) + head
    # conv stem: 3x3 stride-2 convolutions 3 -> 24 -> 48 -> 96 channels (32, 16, 8 px), then 1x1 -> 192
    stem = 32 * 32 * 24 * 3 * 9 + 16 * 16 * 48 * 24 * 9 + 8 * 8 * 96 * 48 * 9 + 8 * 8 * d * 96
    router = 64 * d * d  # the tied cosine router's projection of the 64 patch embeddings
    return stem + 2 * block(65) + router + 4 * block(segments + 1) + head


def test_bench_tool_runs() -> None:
    root = Path(__file__).resolve().parents[2]
    # the fixed-count twin: its count, and so its FLOPs, is known by hand on any image
    cmd = [sys.executable, "tools/bench", "--models", "ViT-Tiny-8", "DRIPTopK-ViT-Tiny-8-4x",
           "--steps", "1", "--warmup", "1", "--batch-size", "2", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["model"] for r in rows] == ["ViT-Tiny-8", "DRIPTopK-ViT-Tiny-8-4x"]
    assert rows[1]["gflops_ratio"] < 1 and rows[1]["act_mb_image_ratio"] < 1 and rows[1]["step_s"] > 0
    # against the hand count: the plain ViT, and DRIP at its configured 4x (round(63 / 4 + 1) = 17
    # segments) and at what the timed steps ran (the fixed-count router cuts every image into 17)
    assert rows[0]["gflops"] == pytest.approx(tiny_tower_macs(None) / 1e9, rel=1e-6)
    assert rows[0]["gflops_run"] == rows[0]["gflops"]
    assert rows[1]["compression"] == pytest.approx(64 / 17)
    assert rows[1]["gflops"] == pytest.approx(tiny_tower_macs(17) / 1e9, rel=1e-6)
    assert rows[1]["gflops_run"] == pytest.approx(tiny_tower_macs(17) / 1e9, rel=1e-6)


def test_conv_stem_gives_the_patch_grid_and_refuses_odd_patches():
    from dtp_ds.models.vit import ConvStem

    stem = ConvStem(8, 3, 192)
    assert stem(torch.randn(2, 3, 64, 64)).shape == (2, 64, 192)  # 8 x 8 grid of 192-d tokens
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(14, 3, 192)
    tiny = open_clip.create_model("DRIP-ViT-Tiny-8-4x")
    assert isinstance(tiny.visual.trunk.patch_embed, ConvStem)
    assert not isinstance(open_clip.create_model("DRIP-ViT-B-32-10x", pretrained=None).visual.trunk.patch_embed,
                          ConvStem)
