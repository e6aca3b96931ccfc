"""Every shipped model with a token reducer states the image-tower compute it promises
(``flops_target``, see dtp_ds.eval.sizing), and its measured ratio, on real images of the
synthetic split in eval mode (training mode where it says ``count: train``), is within +-10%."""
from __future__ import annotations

import re

import pytest
import torch

from dtp_ds.eval.sizing import flops_target, measured_ratio
from dtp_ds.models import CONFIG_DIR, get_model_config
from dtp_ds.models.registry import is_trunk_cfg

REDUCED = [p.stem for p in sorted(CONFIG_DIR.glob("*.json")) if is_trunk_cfg(get_model_config(p.stem)["vision_cfg"])]
SIZES = ["Tiny-8", "B-32", "B-16", "L-14", "H-14"]  # one filled trunk per size at a time (cached)
FAMILIES = ["ToMe", "TokenLearner", "DynamicViT", "DynamicViTDrop", "Grouping", "PatchDrop", "LowRes", "DRIPUniform"]


def size_of(name: str) -> int:
    return next(i for i, s in enumerate(SIZES) if f"ViT-{s}" in name)


def test_every_family_is_shipped_at_every_size_near_0_4() -> None:
    for family in FAMILIES:
        for size in SIZES[1:]:
            target = flops_target(f"{family}-ViT-{size}")
            assert target is not None and (abs(target["ratio"] - 0.4) <= 0.04 or "nearest" in target["note"]), \
                (family, size, target)
    for size in SIZES[1:]:  # DRIP's 4x is its member at 0.4
        assert abs(flops_target(f"DRIP-ViT-{size}-4x")["ratio"] - 0.4) <= 0.04


@pytest.mark.parametrize("name", sorted(REDUCED, key=lambda n: (size_of(n), n)))
def test_measured_flop_ratio_is_within_10_percent_of_the_stated_target(name: str, synth) -> None:
    target = flops_target(name)
    assert target is not None, f"{name} states no flops_target: run tools/size_configs --pin"
    torch.set_num_threads(2)
    got = measured_ratio(name, str(synth / "zeroshot"))
    assert got["ratio"] == pytest.approx(target["ratio"], rel=0.10), (name, got)
    if re.match(r"(LowRes|PatchDrop|Plain)-", name) is None:
        assert got["gflops"] < got["plain_gflops"]
