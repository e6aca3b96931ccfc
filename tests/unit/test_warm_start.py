"""Warm start (dtp_ds.models.adapters): a ViT's weights in dtp_ds's trunk compute that ViT.

The exactness tests: a DRIP trunk (no upsampling) initialised from a plain ViT, with a
boundary at every patch (every segment one patch) and CLS pooling, gives the ViT's embeddings;
the plain trunk from open_clip's ViT gives open_clip's, through ``open_clip.create_model(name,
pretrained=FILE)``."""
from __future__ import annotations

import open_clip
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import param_groups_layer_decay
from torch import nn

import dtp_ds  # noqa: F401  (registers the dtp_ds configs and the warm-start conversion)
from dtp_ds.models import make_reducer, pinned_tokens, register_config, registry
from dtp_ds.models.adapters import FRESH, LOADED, MAPPED, RESIZED, UNUSED, map_state_dict, read_state_dict, warm_start
from dtp_ds.models.vit import VisionTransformer

WIDTH, HEADS, DEPTH, PATCH, IMAGE = 64, 2, 3, 8, 32
PATCHES = (IMAGE // PATCH) ** 2
TEXT = {"context_length": 8, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}
VISION = {"image_size": IMAGE, "layers": DEPTH, "width": WIDTH, "head_width": WIDTH // HEADS, "patch_size": PATCH}
DRIP = {"type": "drip", "pre": 1, "shorten": 2, "post": 0, "compression": 4}
TOL = {"atol": 2e-5, "rtol": 1e-4}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def configs():
    """Registers tiny configs by name (an open_clip ViT, dtp_ds trunks); unregistered after."""
    names = []

    def register(name: str, **vision) -> str:
        register_config(name, {"embed_dim": 32, "vision_cfg": {**VISION, **vision}, "text_cfg": TEXT})
        names.append(name)
        return name

    yield register
    for name in names:
        registry._REGISTERED.pop(name, None)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def images(n: int = 3, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def timm_vit(**kw) -> TimmViT:
    """A timm ViT shaped like the tiny trunk, as timm's CLIP ViTs are: ``pre_norm``, CLS pooling,
    LayerNorm at torch's eps (timm's other ViTs use 1e-6)."""
    args = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, pre_norm=True,
                num_classes=0, global_pool="token", norm_layer=nn.LayerNorm)
    torch.manual_seed(3)
    return TimmViT(**{**args, **kw}).eval()


def trunk(reducer: dict | None, depth: int = DEPTH, image: int = IMAGE, num_classes: int = 0) -> VisionTransformer:
    torch.manual_seed(4)
    red = make_reducer(reducer, WIDTH, depth, (image // PATCH) ** 2)
    return VisionTransformer(image, PATCH, 3, WIDTH, depth, HEADS, num_classes=num_classes, global_pool="cls",
                             reducer=red).eval()


def test_plain_trunk_from_open_clip_vit_through_create_model(configs, tmp_path):
    """open_clip.create_model(dtp_ds name, pretrained=an open_clip ViT's file): both towers as the ViT's."""
    vit_name, plain_name = configs("test-ws-vit"), configs("test-ws-plain", trunk_cfg={"pool": "cls"},
                                                           reducer_cfg={"type": "none"})
    torch.manual_seed(0)
    vit = open_clip.create_model(vit_name).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    model = open_clip.create_model(plain_name, pretrained=str(tmp_path / "vit.pt")).eval()
    text = torch.randint(0, TEXT["vocab_size"], (3, TEXT["context_length"]))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images()), vit.encode_image(images()), **TOL)
        torch.testing.assert_close(model.encode_text(text), vit.encode_text(text), **TOL)
    _, rows = map_state_dict(model, vit.state_dict())
    assert {r.status for r in rows} == {LOADED, MAPPED}  # everything has its place, nothing left over
    proj = next(r for r in rows if r.target == "visual.trunk.head.weight")
    assert (proj.source, proj.status) == ("visual.proj", MAPPED)


@pytest.mark.parametrize("source,predictor", [("timm", "mlp"), ("open_clip", "cosine")])
def test_drip_from_plain_vit_with_a_boundary_at_every_patch(configs, source, predictor):
    """One patch per segment: pooling is the identity, the short blocks see the ViT's tokens."""
    if source == "timm":
        vit = timm_vit()
        model = trunk({**DRIP, "predictor": predictor})
        rows = warm_start(model, vit.state_dict())
        ref, run = vit, model
    else:
        torch.manual_seed(0)
        vit = open_clip.create_model(configs("test-ws-vit")).eval()
        model = open_clip.create_model(configs("test-ws-drip", trunk_cfg={"pool": "cls"},
                                               reducer_cfg={**DRIP, "predictor": predictor})).eval()
        rows = warm_start(model, vit.state_dict())
        ref, run = vit.encode_image, model.encode_image
    fresh = {r.target for r in rows if r.status == FRESH}
    assert fresh and all("reducer.boundary_predictor." in k for k in fresh), fresh  # the only new part
    with torch.no_grad():
        want = ref(images())
        with pinned_tokens(model, PATCHES):
            torch.testing.assert_close(run(images()), want, **TOL)
        # the check can fail: at its own compression DRIP pools patches and is not the ViT
        assert not torch.allclose(run(images()), want, **TOL)


def test_positions_resized_depth_and_layout_differences_are_in_the_table():
    """A timm classifier ViT (patch bias, no pre-norm, head bias) at a 4x4 grid and depth 3 into a
    deeper trunk at 6x6: positions resampled (patch bias folded in), the rest said by name."""
    vit = timm_vit(pre_norm=False, num_classes=10)
    model = trunk(None, depth=DEPTH + 1, image=48, num_classes=10)
    rows = {r.target or r.source: r for r in warm_start(model, vit.state_dict())}
    pos = rows["pos_embed"]
    assert pos.status == RESIZED and "patch_embed.proj.bias" in pos.note and "4x4 -> 6x6" in pos.note
    with_bias = torch.cat([vit.pos_embed[:, :1], vit.pos_embed[:, 1:] + vit.patch_embed.proj.bias], dim=1)
    torch.testing.assert_close(model.pos_embed.data, resample_abs_pos_embed(with_bias.detach(), [6, 6], [4, 4]))
    assert rows["patch_embed.weight"].status == MAPPED and "patch_embed.proj.bias" not in rows  # folded, not unused
    assert rows["norm_pre.weight"].status == FRESH  # the source has none: said, not hidden
    assert {rows[f"blocks.{DEPTH}.mlp.fc1.weight"].status, rows["blocks.0.mlp.fc1.weight"].status} == {FRESH, LOADED}
    assert rows["head.weight"].status == LOADED
    assert rows["head.bias"].status == UNUSED and "bias-free" in rows["head.bias"].note
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight.data, vit.blocks[1].attn.qkv.weight.data)


def test_a_source_that_fits_no_trunk_is_refused():
    vit = timm_vit(embed_dim=2 * WIDTH)
    with pytest.raises(ValueError, match="no weight of the source fits"):
        warm_start(trunk({**DRIP, "predictor": "mlp"}), vit.state_dict())


def test_checkpoint_wrappers_are_read(tmp_path):
    state = timm_vit().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    torch.save({"model": state, "epoch": 3}, tmp_path / "timm.pth")
    for file in ("ddp.pt", "timm.pth"):
        got = read_state_dict(str(tmp_path / file))
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_group_matcher_locks_all_but_the_last_groups_and_decays_by_layer(configs):
    """open_clip's lock_image_tower(unlocked_groups=N) and timm's layer-wise LR decay read the
    trunk's groups: embeddings, each block (the final norm with the last, as timm's ViT), then
    head and reducer (new in a warm start: unlocked first, at the full LR)."""
    model = open_clip.create_model(configs("test-ws-drip", trunk_cfg={"pool": "cls"},
                                           reducer_cfg={**DRIP, "predictor": "mlp"}))
    model.lock_image_tower(unlocked_groups=2)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in model.visual.trunk.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{DEPTH - 1}", "norm", "head", "reducer"}
    drip = trunk({**DRIP, "predictor": "mlp"}, num_classes=8)
    layer = group_parameters(drip, drip.group_matcher(), reverse=True)
    assert layer["cls_token"] == 0 and layer["blocks.1.attn.qkv.weight"] == 2 and layer["norm.weight"] == DEPTH
    assert layer["reducer.boundary_predictor.fc1.weight"] == layer["head.weight"] == DEPTH + 1 == max(layer.values())
    scales = sorted({g["lr_scale"] for g in param_groups_layer_decay(drip, layer_decay=0.5)})
    assert scales == [0.5 ** k for k in range(DEPTH + 1, -1, -1)]
