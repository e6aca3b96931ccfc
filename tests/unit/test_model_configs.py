"""Every shipped model config loads, registers with open_clip/timm and builds the right model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from open_clip.model import CLIP

import dtp_ds
from dtp_ds.models import CONFIG_DIR, VisionTransformer, get_reducer_cfg, register_config, registry, trunks
from dtp_ds.models.registry import timm_name, upgrade_vision_cfg

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
SIZES = ["B-32", "B-16", "L-14", "H-14"]
EXPECTED_DRIP = [f"DRIP-ViT-{s}-{c}x{u}" for s in SIZES for c in (2, 4, 10) for u in ("", "-up")]
EXPECTED_DRIP += ["DRIP-ViT-Tiny-8-4x", "DRIP-ViT-Tiny-8-4x-up"]
OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


def raw(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def base_name(name: str) -> str:
    """DRIP-ViT-B-32-10x-up -> ViT-B-32 (DRIP-ViT-Tiny-8-4x, ToMe-ViT-Tiny-8 -> ViT-Tiny-8)."""
    return re.sub(r"-\d+x(-up)?$", "", re.sub(r"^[A-Za-z]+-(?=ViT-)", "", name))


def base_cfg(name: str) -> dict:
    base = base_name(name)
    path = CONFIG_DIR / f"{base}.json"
    return json.loads((path if path.exists() else OPEN_CLIP_CONFIGS / f"{base}.json").read_text())


def meta_model(name: str) -> CLIP:
    with torch.device("meta"):
        return open_clip.create_model(name, device="meta")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_expected_names_are_shipped_and_registered() -> None:
    assert set(EXPECTED_DRIP) | {"ViT-Tiny-8"} <= set(SHIPPED)
    assert set(SHIPPED) <= set(open_clip.list_models())
    assert set(SHIPPED) <= set(dtp_ds.list_models())


@pytest.mark.parametrize("name", SHIPPED)
def test_config_builds_with_open_clip(name: str) -> None:
    cfg = raw(name)
    model = meta_model(name)
    assert type(model) is CLIP
    assert model.context_length == cfg["text_cfg"]["context_length"]
    vision = upgrade_vision_cfg(cfg["vision_cfg"])  # a legacy drip_cfg reads as reducer_cfg too
    drip = vision.get("reducer_cfg")
    found = trunks(model)
    if drip is None:
        assert not found
        return
    (trunk,) = found
    reducer = trunk.reducer
    assert reducer.type_name == drip["type"] and len(trunk.blocks) == vision["layers"]
    if drip["type"] == "drip":
        assert reducer.layout == (drip["pre"], drip["shorten"], drip["post"])
        assert sum(reducer.layout) == vision["layers"]
        assert reducer.upsample == drip["upsample"] and reducer.compression == drip["compression"]
    assert trunk.img_size == (vision["image_size"],) * 2 and trunk.patch_size == vision["patch_size"]
    assert trunk.embed_dim == vision["width"]
    assert trunk.blocks[0].attn.num_heads == vision["width"] // vision.get("head_width", 64)
    assert trunk.head.out_features == cfg["embed_dim"]
    assert trunk.global_pool == vision.get("trunk_cfg", {}).get("pool", "mean_with_cls")
    assert len(model.visual.head) == 0  # the trunk's head is the CLIP projection
    # Same tower as the plain ViT it derives from, plus only the reducer (the boundary
    # predictor) and, for a conv stem, that stem in place of the linear patch embedding.
    plain = meta_model(base_name(name))
    stem_extra = n_params(trunk.patch_embed) - n_params(plain.visual.conv1)
    assert (stem_extra == 0) == (vision.get("trunk_cfg", {}).get("stem", "patch") == "patch")
    # a lower-resolution trunk (LowRes-*) has fewer positions than its base
    positions = (plain.visual.positional_embedding.shape[0] - trunk.pos_embed.shape[1]) * trunk.embed_dim
    assert (positions != 0) == (vision["image_size"] != base_cfg(name)["vision_cfg"]["image_size"])
    assert n_params(model.visual) - n_params(reducer) - stem_extra + positions == n_params(plain.visual)
    assert n_params(model) - n_params(model.visual) == n_params(plain) - n_params(plain.visual)


@pytest.mark.parametrize("name", ["DRIP-ViT-Tiny-8-4x", "DRIP-ViT-B-32-10x-up"])
def test_legacy_drip_cfg_builds_the_same_parameters(name: str) -> None:
    """The first wave's ``drip_cfg`` (pool and stem inside it) registers and builds the same
    parameter names and shapes as today's trunk_cfg + reducer_cfg."""
    cfg = raw(name)
    vision = cfg["vision_cfg"]
    legacy = {k: v for k, v in vision.pop("reducer_cfg").items() if k != "type"}
    legacy.update(vision.pop("trunk_cfg", {}))
    vision["drip_cfg"] = legacy
    register_config(name + "-legacy", cfg)
    try:
        shapes = {k: v.shape for k, v in meta_model(name + "-legacy").state_dict().items()}
        assert shapes == {k: v.shape for k, v in meta_model(name).state_dict().items()}
        assert get_reducer_cfg(name + "-legacy") == raw(name)["vision_cfg"]["reducer_cfg"]
    finally:
        registry._REGISTERED.pop(name + "-legacy", None)
        open_clip.factory._MODEL_CONFIGS.pop(name + "-legacy", None)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith(("DRIP-", "DRIPTopK-"))])
def test_drip_config_matches_its_base_and_layout_rules(name: str) -> None:
    cfg = raw(name)
    cfg.pop("flops_target")  # tests/unit/test_flops_targets.py
    cfg["vision_cfg"].pop("trunk_cfg", None)
    drip = cfg["vision_cfg"].pop("reducer_cfg")
    # Widths, layers, patch, image size, embed_dim and text tower copied from the base JSON.
    assert cfg == base_cfg(name)
    assert drip["upsample"] == name.endswith("-up")
    assert drip["compression"] == int(re.search(r"-(\d+)x", name).group(1))
    assert (drip["post"] > 0) == drip["upsample"]
    if not drip["upsample"]:
        up = raw(name + "-up")["vision_cfg"]["reducer_cfg"]
        assert up["pre"] == drip["pre"] and up["post"] == drip["pre"]  # symmetric full-length ends
    layers = cfg["vision_cfg"]["layers"]
    if layers == 12:
        expected = (2, 8, 2) if drip["upsample"] else (2, 10, 0)
        assert (drip["pre"], drip["shorten"], drip["post"]) == expected


def test_tokenizer_and_transforms() -> None:
    tok = open_clip.get_tokenizer("DRIP-ViT-B-32-10x")
    assert tok(["a photo of a cat"]).shape == (1, 77)
    _, _, preprocess = open_clip.create_model_and_transforms("DRIP-ViT-Tiny-8-4x")
    from PIL import Image

    image = preprocess(Image.new("RGB", (100, 80)))
    assert image.shape == (3, 64, 64)


def test_timm_entrypoint_and_reducer_cfg() -> None:
    trunk = timm.create_model(timm_name("DRIP-ViT-Tiny-8-4x"), num_classes=0, global_pool="cls")
    assert isinstance(trunk, VisionTransformer) and trunk.global_pool == "cls"
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 192)
    assert get_reducer_cfg("DRIP-ViT-B-32-10x")["compression"] == 10
    assert get_reducer_cfg("ViT-Tiny-8") is None


def test_bad_configs_are_refused() -> None:
    good = raw("DRIP-ViT-Tiny-8-4x")
    bad_key = json.loads(json.dumps(good))
    bad_key["vision_cfg"]["reducer_cfg"]["shorten_layers"] = 3
    with pytest.raises(ValueError, match="DRIP-bad-key: reducer_cfg .*shorten_layers.*the 'drip' reducer takes"):
        register_config("DRIP-bad-key", bad_key)
    bad_depth = json.loads(json.dumps(good))
    bad_depth["vision_cfg"]["reducer_cfg"]["shorten"] = 5
    with pytest.raises(ValueError, match="DRIP-bad-depth: .*!= the trunk's 6 blocks"):
        register_config("DRIP-bad-depth", bad_depth)
    with pytest.raises(ValueError, match="unknown model"):
        dtp_ds.create_model("DRIP-ViT-B-32-3x")


def test_register_model_file_names_the_model_after_the_file(tmp_path) -> None:
    from dtp_ds.models import register_model_file

    path = tmp_path / "DRIP-mine-4x.json"
    path.write_text(json.dumps(raw("DRIP-ViT-Tiny-8-4x")))
    try:
        assert register_model_file(path) == "DRIP-mine-4x"
        assert open_clip.create_model("DRIP-mine-4x").visual.trunk.reducer.compression == 4
    finally:
        registry._REGISTERED.pop("DRIP-mine-4x", None)
        open_clip.factory._MODEL_CONFIGS.pop("DRIP-mine-4x", None)
    with pytest.raises(ValueError, match="no such model config file .*missing.json"):
        register_model_file(tmp_path / "missing.json")
