"""Every shipped model with a token reducer states the image-tower compute it promises
(``flops_target``, see dtp_ds.eval.sizing): its FLOPs as a ratio of the same trunk without a reducer,
in eval mode on real images (training mode where it says ``count: train``), within +-10%.

The targets were written by ``tools/size_configs`` with :func:`dtp_ds.eval.sizing.measured_ratio`
(torch's FlopCounterMode, on one image). Checking them with that function again would be circular,
so this file counts on its own:

* a hand count of the trunk (:func:`hand_macs`): the stem, per block qkv + projection + MLP
  (``12 T D^2``) and attention (``2 T^2 D``) at the tokens entering the block, the head, and the
  reducer's own layers, family by family;
* fvcore's count (its own op handles, which skip attention: that term is added by hand at the
  sequence length every attention module is seen to get) on several real images for every Tiny-8
  config and for DRIP-ViT-B-32-10x (the users' model): image by image it must equal the hand count
  at the tokens the blocks got, and those must be the ones the reducer plans (where the count
  depends on the image, DRIP cutting where its predictor says: on average over the images, within
  a token of the plan, an expectation); the target is checked at the mean over the images;
* the hand count at the planned tokens for every config at every size (the B-16 to H-14 trunks are
  not run: minutes of CPU for what arithmetic gives), held against the stated target: within
  the promised 10%, and to the pin's rounding where the target is a pinned measurement ("measured
  when shipped").

Multiply-adds throughout (1 multiply-add = 1 FLOP, the users' fvcore convention); only matrix
products and convolutions count (fvcore's LayerNorm and pooling entries are left out).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import dtp_ds
from dtp_ds.data.synthetic import render, sample_spec
from dtp_ds.eval.sizing import flops_target
from dtp_ds.models import CONFIG_DIR, get_model_config, make_reducer, trunks
from dtp_ds.models.registry import is_trunk_cfg
from dtp_ds.models.vit import Attention

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

REDUCED = [p.stem for p in sorted(CONFIG_DIR.glob("*.json")) if is_trunk_cfg(get_model_config(p.stem)["vision_cfg"])]
SIZES = ["Tiny-8", "B-32", "B-16", "L-14", "H-14"]
FAMILIES = ["ToMe", "TokenLearner", "DynamicViT", "DynamicViTDrop", "Grouping", "PatchDrop", "LowRes", "DRIPUniform"]
RUN = [n for n in REDUCED if "ViT-Tiny-8" in n] + ["DRIP-ViT-B-32-10x"]  # counted by fvcore on real images
IMAGES = 3
PROMISE = 0.10  # the stated target's tolerance
PIN_ROUNDING = 6e-4  # a pinned target is a measurement rounded to 3 decimals
FVCORE_MATMULS = {"conv", "linear", "matmul", "einsum", "bmm", "addmm", "mm", "baddbmm"}


def size_of(name: str) -> int:
    return next(i for i, s in enumerate(SIZES) if f"ViT-{s}" in name)


# --- the hand count --------------------------------------------------------------------------
def stem_macs(vision: dict[str, Any], image_size: int) -> int:
    width, patch = vision["width"], vision["patch_size"]
    if vision.get("trunk_cfg", {}).get("stem", "patch") == "conv":
        # stride-2 3x3 convolutions down to the patch grid (channels max(16, D / 2^k)), then a 1x1
        steps = patch.bit_length() - 1
        macs, chans, side = 0, 3, image_size
        for i in range(steps):
            out = max(16, width // 2 ** (steps - i))
            side //= 2
            macs += side * side * out * chans * 9
            chans = out
        return macs + side * side * width * chans
    return (image_size // patch) ** 2 * 3 * patch * patch * width  # one linear patch projection


def attention_macs(tokens: int, width: int) -> int:
    return 4 * tokens * width * width + 2 * tokens * tokens * width  # qkv + out projection; QK^T and AV


def mlp_macs(tokens: int, width: int, ratio: float) -> int:
    return 2 * tokens * width * int(width * ratio)


def tome_mergeable(tokens: int, r: int) -> int:
    """Tokens one bipartite step merges (ToMe: A = even positions less CLS, at most |B|)."""
    return max(0, min(r, (tokens + 1) // 2 - 1, tokens // 2))


def planned_tokens(cfg: dict[str, Any], image_size: int, train: bool) -> list[float]:
    """Tokens (CLS included) entering each block, as the config's reducer plans them."""
    vision = cfg["vision_cfg"]
    patches = (image_size // vision["patch_size"]) ** 2
    reducer_cfg = vision.get("reducer_cfg") or {"type": "none"}
    if reducer_cfg["type"] == "patch_dropout" and not train:
        return [patches + 1.0] * vision["layers"]  # evaluation sees every patch
    with torch.device("meta"):
        reducer = make_reducer(reducer_cfg, vision["width"], vision["layers"], patches)
    return reducer.planned_tokens(patches, vision["layers"])


def content_dependent(cfg: dict[str, Any]) -> bool:
    """Whether the config's token count depends on the image (DRIP cutting where its predictor
    says, not at a fixed count): its plan is then an expectation."""
    rc = cfg["vision_cfg"].get("reducer_cfg") or {"type": "none"}
    predictor = rc.get("predictor", "mlp")
    top_k = predictor == "cosine" and rc.get("selection") == "topk"
    return rc["type"] == "drip" and predictor != "fixed" and not top_k


def hand_macs(cfg: dict[str, Any], image_size: int | None = None, train: bool = False,
              reducer: bool = True) -> float:
    """Multiply-adds of one image through the config's image trunk (``reducer=False``: the same
    trunk without its reducer), worked out from the config's shapes at the tokens its reducer
    plans; a fractional plan (a mean over images) is the linear interpolation of the whole counts
    around it."""
    vision = cfg["vision_cfg"]
    image_size = image_size or vision.get("image_size", 224)
    rc = dict(vision.get("reducer_cfg") or {"type": "none"}) if reducer else {"type": "none"}
    cfg = {**cfg, "vision_cfg": {**vision, "reducer_cfg": rc}}
    planned = planned_tokens(cfg, image_size, train)
    fractions = {t - math.floor(t) for t in planned} - {0.0}
    assert len(fractions) <= 1, planned  # one fractional count (DRIP's short blocks)
    if not fractions:
        return macs_at(cfg, [int(t) for t in planned], image_size)
    frac = fractions.pop()
    low = macs_at(cfg, [math.floor(t) for t in planned], image_size)
    return (1.0 - frac) * low + frac * macs_at(cfg, [math.ceil(t) for t in planned], image_size)


def macs_at(cfg: dict[str, Any], tokens: list[int], image_size: int) -> int:
    """Multiply-adds of one image through the config's trunk when ``tokens`` (CLS included)
    enter its blocks."""
    vision, rc = cfg["vision_cfg"], cfg["vision_cfg"].get("reducer_cfg") or {"type": "none"}
    width, depth, head_width = vision["width"], vision["layers"], vision.get("head_width", 64)
    ratio = vision.get("mlp_ratio", 4.0)
    patches = (image_size // vision["patch_size"]) ** 2
    total = stem_macs(vision, image_size) + width * cfg["embed_dim"]  # the bias-free head on the pooled token
    kind = rc["type"]
    if kind == "tome":  # merging runs between attention and MLP: the MLP sees the merged sequence
        r = rc["r"] if isinstance(rc["r"], list) else [rc["r"]] * depth
        for t, r_i in zip(tokens, r):
            merged = tome_mergeable(t, r_i)
            total += attention_macs(t, width) + mlp_macs(t - merged, width, ratio)
            if merged:  # similarity of the keys (averaged over heads), A (even) x B (odd)
                total += ((t + 1) // 2) * (t // 2) * head_width
        return total
    total += sum(attention_macs(t, width) + mlp_macs(t, width, ratio) for t in tokens)
    if kind == "drip":
        predictor = rc.get("predictor", "mlp")
        if predictor == "cosine":  # W_q (and W_k unless tied) on the patch embeddings
            total += patches * width * width if rc.get("tied") else 2 * (patches - 1) * width * width
        elif predictor == "mlp":  # Linear(D, hidden), GELU, Linear(hidden, 1) on every patch token
            hidden = rc.get("predictor_hidden") or width
            total += patches * (width * hidden + hidden)
        elif predictor != "fixed":  # evenly spaced: nothing to compute
            raise NotImplementedError(f"hand count of DRIP predictor {predictor!r}")
    elif kind in ("dynamicvit", "dynamicvit_drop"):
        # per stage (3/6/9 of 12 by default) a predictor D -> D, D -> D/2 -> D/4 -> 2 on the patch
        # tokens entering it
        for s in rc.get("stages") or [depth * k // 4 for k in (1, 2, 3)]:
            n = tokens[s - 1] - 1
            total += n * (width * width + width * (width // 2) + (width // 2) * (width // 4) + (width // 4) * 2)
    elif kind == "tokenlearner":
        learned, hidden = rc.get("tokens", 8), rc.get("hidden") or width
        # MLP D -> hidden -> S on every patch token, then the S weighted means of the patches
        total += patches * (width * hidden + hidden * learned + learned * width)
    elif kind == "grouping":
        iters, stride, n = rc.get("iters", 2), rc.get("stride", 2), patches
        payloads = [width + 1] * (iters - 1) + [2 * width + 1]  # (v, 1); the last round also x
        for _ in rc.get("local_at", [2]):
            m = n // stride**2
            total += n * width * width + 2 * n * width * width  # strided conv init; k, v
            for p in payloads:  # q of the centroids; each token against its 3x3 window; the means
                total += m * width * width + 9 * n * width + 9 * n * p
            total += m * width * width  # output projection
            n = m
        if rc.get("dense_at", 4) is not None:
            m = rc.get("tokens", 8)
            total += 2 * n * width * width
            for p in payloads:
                total += m * width * width + n * m * width + n * m * p
            total += m * width * width
    elif kind not in ("none", "patch_dropout"):
        raise NotImplementedError(f"hand count of reducer {kind!r}: add its layers here")
    return total


def hand_ratio(name: str) -> float:
    cfg = get_model_config(name)
    target = flops_target(name)
    size = cfg["vision_cfg"].get("image_size", 224)
    reference = target.get("reference_image_size", size)
    return hand_macs(cfg, size, train=target["count"] == "train") / hand_macs(cfg, reference, reducer=False)


def check_against_target(name: str, ratio: float) -> None:
    target = flops_target(name)
    assert ratio == pytest.approx(target["ratio"], rel=PROMISE), (name, ratio, target)
    if target.get("note") == "measured when shipped":
        assert ratio == pytest.approx(target["ratio"], abs=PIN_ROUNDING), (name, ratio, target)
    if not name.startswith("PatchStem-"):
        assert ratio < 1.0, (name, ratio)


# --- fvcore on real images ------------------------------------------------------------------
def real_images(size: int, count: int) -> list[torch.Tensor]:
    """Synthetic scenes (shapes on plain or textured backgrounds, some with a second object),
    drawn at ``size`` and preprocessed as evaluation does."""
    from open_clip.transform import image_transform

    transform = image_transform(size, is_train=False)
    out = []
    for seed in range(count):
        rng = np.random.default_rng(1000 + seed)
        out.append(transform(render(rng, sample_spec(rng, distractor_prob=0.5), size)).unsqueeze(0))
    return out


def fvcore_count(trunk: torch.nn.Module, image: torch.Tensor) -> tuple[float, list[int]]:
    """(fvcore's matrix-product multiply-adds + attention's by hand, the sequence length each
    attention module ran at) for one image."""
    lengths: list[tuple[int, int]] = []

    def seen(_module: torch.nn.Module, args: tuple) -> None:
        x, packing = args[0], (args[1] if len(args) > 1 else None)
        length = x.shape[1] if packing is None else packing.max_len  # packed rows: SDPA's padded length
        lengths.append((int(length), int(x.shape[-1])))

    hooks = [m.register_forward_pre_hook(seen) for m in trunk.modules() if isinstance(m, Attention)]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about data-dependent shapes
            analysis = FlopCountAnalysis(trunk, (image,))
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            by_op = analysis.by_operator()
    finally:
        for h in hooks:
            h.remove()
    matmuls = sum(float(v) for k, v in by_op.items() if k in FVCORE_MATMULS)
    return matmuls + sum(2 * t * t * d for t, d in lengths), [t for t, _ in lengths]


# --- tests -----------------------------------------------------------------------------------
def test_every_family_is_shipped_at_every_size_near_0_4() -> None:
    for family in FAMILIES:
        for size in SIZES[1:]:
            target = flops_target(f"{family}-ViT-{size}")
            assert target is not None and (abs(target["ratio"] - 0.4) <= 0.04 or "nearest" in target["note"]), \
                (family, size, target)
    for size in SIZES[1:]:  # DRIP's 4x is its member at 0.4
        assert abs(flops_target(f"DRIP-ViT-{size}-4x")["ratio"] - 0.4) <= 0.04


def test_hand_count_of_a_plain_vit_b_32() -> None:
    """The arithmetic itself, once written out: ViT-B-32 at 224 px, 50 tokens, width 768."""
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}}
    stem = 49 * 3 * 32 * 32 * 768
    block = 4 * 50 * 768**2 + 2 * 50**2 * 768 + 2 * 50 * 768 * 3072
    assert hand_macs(cfg) == stem + 12 * block + 768 * 512 == 4_408_811_520  # 4.41 GMACs


@pytest.mark.parametrize("name", RUN)
def test_hand_count_equals_fvcore_on_real_images(name: str) -> None:
    cfg = get_model_config(name)
    target = flops_target(name)
    train = target["count"] == "train"
    size = cfg["vision_cfg"].get("image_size", 224)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # open_clip: "no pretrained weights loaded"
    try:
        trunk = trunks(dtp_ds.create_model(name))[0]
    finally:
        logging.disable(logging.NOTSET)
    trunk.train(train)
    counts, lengths = zip(*(fvcore_count(trunk, image) for image in real_images(size, IMAGES)))
    for count, seen in zip(counts, lengths):  # image by image, at the tokens that image got
        assert count == pytest.approx(macs_at(cfg, seen, size), rel=1e-6), (name, count, seen)
    # the tokens may depend on the image (a content-adaptive reducer): the mean over the images
    # lies within a token of the plan (its expectation); every other reducer keeps what it plans
    mean_lengths = np.mean(np.array(lengths, dtype=float), axis=0).tolist()
    assert mean_lengths == pytest.approx(planned_tokens(cfg, size, train), abs=1.0 if content_dependent(cfg) else 0), \
        (name, lengths)
    if not content_dependent(cfg):
        assert float(np.mean(counts)) == pytest.approx(hand_macs(cfg, size, train=train), rel=1e-6), (name, counts)
    reference = target.get("reference_image_size", size)
    check_against_target(name, float(np.mean(counts)) / hand_macs(cfg, reference, reducer=False))


@pytest.mark.parametrize("name", sorted(REDUCED, key=lambda n: (size_of(n), n)))
def test_stated_target_holds_by_hand_count(name: str) -> None:
    assert flops_target(name) is not None, f"{name} states no flops_target: run tools/size_configs --pin"
    check_against_target(name, hand_ratio(name))


def test_hand_count_can_fail() -> None:
    """A config whose reducer changed since its target was pinned is caught (DRIP-B-32 at 4x
    instead of the 10x its target was measured at; ToMe merging half as much)."""
    cfg = get_model_config("DRIP-ViT-B-32-10x")
    drifted = {**cfg, "vision_cfg": {**cfg["vision_cfg"],
                                     "reducer_cfg": {**cfg["vision_cfg"]["reducer_cfg"], "compression": 4}}}
    ratio = hand_macs(drifted) / hand_macs(drifted, reducer=False)
    assert ratio != pytest.approx(flops_target("DRIP-ViT-B-32-10x")["ratio"], abs=PIN_ROUNDING)
    cfg = get_model_config("ToMe-ViT-B-16")
    r = [v // 2 for v in cfg["vision_cfg"]["reducer_cfg"]["r"]]
    drifted = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "reducer_cfg": {"type": "tome", "r": r}}}
    ratio = hand_macs(drifted) / hand_macs(drifted, reducer=False)
    assert not math.isclose(ratio, flops_target("ToMe-ViT-B-16")["ratio"], rel_tol=PROMISE), ratio
