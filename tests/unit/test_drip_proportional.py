"""DRIP's proportional attention (``reducer_cfg`` ``proportional_attention``, issue 23's hypothesis
arm ``drip-prop``): a pooled segment of k patches is one key whose logit gets log k in the
shorten blocks, through the trunk's generic per-key bias on packed rows. Off by default; with
every segment one patch it changes nothing; with sizes it is the attention written out by hand
(and the attention over the segment's k copies); gradients reach every parameter; the
checkpoint's keys do not change."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch

from dtp_ds.bench.compare_reducers import ARMS, write_arm_config
from dtp_ds.models import VisionTransformer, pinned_tokens, record_forward, registry
from dtp_ds.models.reducers.drip import DripReducer
from dtp_ds.models.segments import make_packing, row_sizes
from dtp_ds.models.vit import Attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def router_trunk(proportional: bool, upsample: bool = False) -> VisionTransformer:
    """32 px, patch 4 (64 patches), width 32, the shipped router (adaptive count): 1 pre block,
    2 shorten blocks [+ 1 post block after upsampling]; the same weights for either setting."""
    torch.manual_seed(0)
    post = 1 if upsample else 0
    reducer = DripReducer(dim=32, depth=3 + post, num_patches=64, pre=1, shorten=2, post=post, upsample=upsample,
                          compression=4, predictor="cosine", predictor_input="embed", selection="adaptive",
                          tied=True, proportional_attention=proportional)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3 + post, num_heads=2, num_classes=16,
                             reducer=reducer)


def test_off_by_default_and_refuses_a_non_boolean() -> None:
    assert DripReducer(dim=32, depth=3, num_patches=64, pre=1, shorten=2).proportional_attention is False
    with pytest.raises(ValueError, match="proportional_attention must be true or false"):
        DripReducer(dim=32, depth=3, num_patches=64, pre=1, shorten=2, proportional_attention="yes")


@pytest.mark.parametrize("upsample", [False, True])
def test_segments_of_one_patch_change_nothing(upsample: bool) -> None:
    """Every patch its own segment (pinned at 64): log 1 = 0 on every key, the option off's output."""
    on, off = router_trunk(True, upsample).double().eval(), router_trunk(False, upsample).double().eval()
    off.load_state_dict(on.state_dict())
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), pinned_tokens(on, 64), pinned_tokens(off, 64):
        torch.testing.assert_close(on(images), off(images), rtol=1e-12, atol=1e-12)
        # at the configured rate the segments have sizes, and the outputs differ
        assert not torch.allclose(router_trunk(True, upsample).double().eval()(images), off(images))


def hand_attention(attn: Attention, rows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """One sample's attention written out: per head softmax_j(q_i . k_j / sqrt(d) + log size_j) v_j."""
    q, k, v = attn.qkv(rows).chunk(3, dim=-1)
    heads, out = attn.num_heads, []
    d = q.shape[-1] // heads
    for h in range(heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        logits = qh @ kh.T / math.sqrt(d) + sizes.log()[None, :]
        out.append(torch.softmax(logits, dim=-1) @ vh)
    return attn.proj(torch.cat(out, dim=-1))


def test_packed_attention_equals_the_hand_written_reference() -> None:
    """Two images of 6 patches, segments of 3, 1, 2 and of 5, 1 patches: rows of unequal length
    (the shorter padded and masked), each segment's key weighed by its size."""
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 1]])
    packing = make_packing(ids)
    assert packing.padded and packing.lengths.tolist() == [4, 3]
    sizes = row_sizes(packing)
    assert sizes.tolist() == [1, 3, 1, 2, 1, 5, 1]  # CLS 1, then each segment's patches
    attn = Attention(8, num_heads=2).double()
    rows = torch.randn(packing.num_rows, 8, dtype=torch.float64)
    got = attn(rows, packing, key_bias=sizes.log().double())
    for b in range(2):
        own = slice(int(packing.starts[b]), int(packing.starts[b] + packing.lengths[b]))
        torch.testing.assert_close(got[own], hand_attention(attn, rows[own], sizes[own].double()))
    # ToMe's reading: a segment of k patches weighs as its k copies would in plain attention
    sample = slice(0, 4)
    copies = rows[sample].repeat_interleave(sizes[sample].long(), dim=0)  # (1 + 6, D): every patch a copy
    plain = attn(copies.unsqueeze(0))[0]
    first_of_each = torch.cumsum(sizes[sample].long(), 0) - sizes[sample].long()
    torch.testing.assert_close(got[sample], plain[first_of_each])


def test_the_reducer_biases_each_segment_by_its_patch_count() -> None:
    """What the shorten blocks' attention receives: log of each segment's patches (the groups the
    forward reports), 0 for CLS; the post blocks after upsampling receive no bias. In training,
    where the batch's top-k gives each image its own count."""
    trunk = router_trunk(True, upsample=True).train()
    seen: dict[int, torch.Tensor | None] = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[2]))
             for i, blk in enumerate(trunk.blocks)]
    with torch.no_grad(), record_forward() as rec:
        trunk(torch.randn(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    groups = rec[0].groups
    expected = torch.cat([torch.cat([torch.zeros(1), torch.bincount(g).float().log()]) for g in groups])
    assert groups.max(1).values.unique().numel() > 1  # the count follows content: rows of unequal length
    assert seen[0] is None and seen[3] is None  # pre block and post block: no bias
    for i in (1, 2):
        torch.testing.assert_close(seen[i], expected)


@pytest.mark.parametrize("upsample", [False, True])
def test_gradients_reach_every_parameter(upsample: bool) -> None:
    trunk = router_trunk(True, upsample).train()
    with record_forward() as rec:
        out = trunk(torch.randn(4, 3, 32, 32))
    loss = out.square().mean() + sum(rec[0].aux_losses.values())
    loss.backward()
    for name, p in trunk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_checkpoint_keys_unchanged() -> None:
    on, off = router_trunk(True, upsample=True), router_trunk(False, upsample=True)
    assert list(on.state_dict()) == list(off.state_dict())
    off.load_state_dict(on.state_dict(), strict=True)
    on.load_state_dict(off.state_dict(), strict=True)


def test_compare_arm_trains_the_adaptive_router_with_the_option(tmp_path) -> None:
    assert ARMS["drip-prop"] == ({**ARMS["drip"][0], "proportional_attention": True}, ARMS["drip"][1])
    assert ARMS["drip"][0].get("proportional_attention", False) is False
    name = registry.register_model_file(write_arm_config("drip-prop", str(tmp_path)))
    try:
        reducer = registry.vision_tower(name, num_classes=8).reducer
    finally:
        registry._REGISTERED.pop(name, None)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    assert reducer.proportional_attention is True
    assert reducer.boundary_predictor.selection == "adaptive"
