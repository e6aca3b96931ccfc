"""``tools/size_configs``: write each token-reduction family's model JSON at each trunk size, its
knob solved so the image tower's measured FLOPs (:func:`dtp_ds.eval.sizing.measured_ratio`) come
closest to a target ratio of the plain trunk's; ``--pin`` instead writes into shipped configs
without a ``flops_target`` what they measure (so the test pins them against drift);
``--gumbel-twins`` writes the seed's DRIP (``DRIPGumbel-*``, DTP's Gumbel-Sigmoid MLP) twin of
every DRIP router config, its target measured; ``--router-selections`` sets every DRIP router
config to the adaptive count (the default) and writes its fixed-count twin (``DRIPTopK-*``),
their targets measured.

A family is one monotone knob (more of it: fewer FLOPs) and the ``reducer_cfg`` (or image size)
it gives at a trunk shape; the search is a bisection over the knob's candidates on real images.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

import dtp_ds  # noqa: F401  (registers the shipped configs)
from dtp_ds.eval import sizing
from dtp_ds.eval.sizing import flops_target, measured_ratio
from dtp_ds.models import CONFIG_DIR, expected_segments, get_model_config, get_reducer_cfg, list_models, make_reducer
from dtp_ds.models.reducers.drip import DripReducer
from dtp_ds.models.registry import is_trunk_cfg

# base name -> (open_clip or dtp_ds config, trunk_cfg of every family at that size)
BASES: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"pool": "mean_with_cls"},
    "ViT-B-16": {"pool": "mean_with_cls"},
    "ViT-L-14": {"pool": "mean_with_cls"},
    "ViT-H-14": {"pool": "mean_with_cls"},
    "ViT-Tiny-8": {"pool": "mean_with_cls", "stem": "conv"},
}
# The tiny configs train in ``make compare`` next to DRIP-ViT-Tiny-8-4x: matched to its compute.
TINY_TARGET = 0.54


@dataclass(frozen=True)
class Shape:
    depth: int
    grid: int  # patches per side
    patch: int
    image_size: int

    @property
    def patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class Family:
    prefix: str  # the name is f"{prefix}-{base}"
    knobs: Callable[[Shape], list[Any]]  # candidates, FLOPs falling along the list
    reducer: Callable[[Shape, Any], dict[str, Any]]
    image_size: Callable[[Shape, Any], int] | None = None
    count: str = "inference"
    note: str = ""


def _tome_r(s: Shape, r0: float) -> list[int]:
    # r falls linearly to 0 at the last block: a constant r empties a 49-token sequence by block 6
    return [round(r0 * (s.depth - 1 - i) / (s.depth - 1)) for i in range(s.depth)]


def _by_planned_tokens(s: Shape, cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reducer configs in order of the tokens they plan for over all blocks (most first): the
    order FLOPs fall in, as bisection needs, where a family's knob has several parts."""
    def total(cfg: dict[str, Any]) -> float:
        with torch.device("meta"):
            return sum(make_reducer(cfg, 64, s.depth, s.patches).planned_tokens(s.patches, s.depth))
    return sorted(cfgs, key=total, reverse=True)


def _learned_tokens(s: Shape) -> list[dict[str, Any]]:
    # S = 8 or 16 as published, 4 where the grid is tiny
    return _by_planned_tokens(s, [{"type": "tokenlearner", "at": at, "tokens": n}
                                  for at in range(1, s.depth) for n in (4, 8, 16) if n < s.patches // 2])


def _groupings(s: Shape) -> list[dict[str, Any]]:
    # one local layer (stride 2) where the grid side is even, then the dense layer; B-32's 7x7 grid
    # has no even split: the dense layer alone
    local = [[a] for a in range(1, s.depth - 1)] if s.grid % 2 == 0 else [[]]
    return _by_planned_tokens(s, [
        {"type": "grouping", "local_at": at, "stride": 2, "dense_at": b, "tokens": n, "iters": 2}
        for at in local for b in range((at or [1])[-1], s.depth) for n in (8, 16) if n < s.patches // 4])


def _drip_like(base: str) -> dict[str, Any]:
    # the fixed-count twin: evenly spaced boundaries have one count per image, as it does
    return dict(get_reducer_cfg(f"{TOPK_PREFIX}-{base}-4x"))


FAMILIES: dict[str, Family] = {f.prefix: f for f in [
    Family("ToMe", lambda s: [0.5 * i for i in range(1, s.patches + 1)],
           lambda s, r0: {"type": "tome", "r": _tome_r(s, r0)}),
    Family("TokenLearner", _learned_tokens, lambda s, cfg: cfg),
    Family("Grouping", _groupings, lambda s, cfg: cfg),
    # keep rho, rho^2, rho^3 of the patches at the default stages (3/6/9 of 12 blocks, as published)
    Family("DynamicViT", lambda s: [round(1.0 - 0.01 * i, 2) for i in range(1, 100)],
           lambda s, rho: {"type": "dynamicvit", "rho": rho},
           note="evaluation (top-k); training runs every token, attention masked"),
    Family("DynamicViTDrop", lambda s: [round(1.0 - 0.01 * i, 2) for i in range(1, 100)],
           lambda s, rho: {"type": "dynamicvit_drop", "rho": rho}),
    Family("PatchDrop", lambda s: [round(0.01 * i, 2) for i in range(1, 96)],
           lambda s, p: {"type": "patch_dropout", "prob": p, "ordered": True, "final_unmasked": 0.1},
           count="train", note="training FLOPs (masked phase); evaluation sees every patch"),
    Family("LowRes", lambda s: list(range(s.grid - 1, 0, -1)), lambda s, k: {"type": "none"},
           image_size=lambda s, k: k * s.patch, note="the plain trunk at a lower resolution (CLIPA)"),
    # DRIP's control: its 4x trunk with evenly spaced boundaries, matched in tokens, not sized
    Family("DRIPUniform", lambda s: [None], lambda s, base: {}, note="DRIP-4x with evenly spaced boundaries"),
]}


# The seed's DRIP: DTP's predictor (Nawrot et al. 2023) as the seed describes it, a twin of every
# router config (``DRIP-ViT-...`` -> ``DRIPGumbel-ViT-...``): same trunk, layout and compression.
GUMBEL_PREFIX = "DRIPGumbel"
GUMBEL_TEMPERATURE = 0.5  # the seed's Gumbel-Sigmoid temperature ("about 0.5")
GUMBEL_IMAGES = 1  # real images its flops_target is measured on (pinned: every image the same count)


def twin_name(router: str, prefix: str) -> str:
    """``DRIP-ViT-B-32-10x-up`` -> ``<prefix>-ViT-B-32-10x-up``."""
    if not router.startswith("DRIP-ViT-"):
        raise ValueError(f"not a DRIP router config name: {router!r}")
    return prefix + router[len("DRIP"):]


def gumbel_twin_name(router: str) -> str:
    """``DRIP-ViT-B-32-10x-up`` -> ``DRIPGumbel-ViT-B-32-10x-up``."""
    return twin_name(router, GUMBEL_PREFIX)


def gumbel_twin_config(router: str) -> dict[str, Any]:
    """The seed's DRIP at ``router``'s trunk, layout and compression: an MLP (Linear(D, 4D),
    GELU, Linear(4D, 1): DTP's ``d_inner``, its transformer's feed-forward width) on the tokens
    after the ``pre`` blocks (DTP's place), Gumbel-Sigmoid at temperature 0.5 with a
    straight-through estimator (DTP's cumulative-sum path), the Binomial rate loss, and the
    deterministic ``expected`` evaluation rule at the training compression. No ``flops_target``."""
    cfg = copy.deepcopy(get_model_config(router))
    cfg.pop("flops_target", None)
    vision = cfg["vision_cfg"]
    rc = vision["reducer_cfg"]
    vision["reducer_cfg"] = {
        **{k: rc[k] for k in ("type", "pre", "shorten", "post", "upsample", "compression")},
        "predictor": "mlp",
        "predictor_input": "tokens",
        "predictor_hidden": int(vision.get("mlp_ratio", 4.0) * vision.get("width", 768)),
        "temperature": GUMBEL_TEMPERATURE,
        "straight_through": "cumsum",
        "eval_rule": "expected",
    }
    return cfg


# The router's two counts: ``DRIP-ViT-...`` follows content (``selection: adaptive``, the default),
# its twin ``DRIPTopK-ViT-...`` gives every image the prior's count (``topk``); same trunk, layout,
# compression and evaluation compute (an uncalibrated adaptive router evaluates at the top-k).
TOPK_PREFIX = "DRIPTopK"
ROUTER_SELECTION = "adaptive"
ADAPTIVE_TARGET_NOTE = ("measured untrained (evaluation at the per-image top-k until the threshold is calibrated); "
                        "trained, each image's count follows content, the prior's mean on average")


def topk_twin_name(router: str) -> str:
    """``DRIP-ViT-B-32-10x-up`` -> ``DRIPTopK-ViT-B-32-10x-up``."""
    return twin_name(router, TOPK_PREFIX)


def router_config(router: str, selection: str) -> dict[str, Any]:
    """``router``'s config with the cosine router's ``selection``, no ``flops_target``."""
    cfg = copy.deepcopy(get_model_config(router))
    cfg.pop("flops_target", None)
    cfg["vision_cfg"]["reducer_cfg"]["selection"] = selection
    return cfg


def write_router_selections(image_dir: str, out: Path, bases: list[str]) -> None:
    """Every shipped ``DRIP-ViT-<base>-...`` router config with the adaptive count, and its
    ``DRIPTopK-`` twin with the fixed count; both targets measured (:func:`measured_ratio`, as
    ``--pin``): the twin's pinned, the adaptive one's stated as the untrained model's."""
    for router in [n for n in list_models() if n.startswith("DRIP-ViT-")]:
        if not any(router.startswith(f"DRIP-{b}-") for b in bases):
            continue
        topk, adaptive = router_config(router, "topk"), router_config(router, ROUTER_SELECTION)
        ratio = round(measured_ratio(router, image_dir, cfg=topk)["ratio"], 3)
        topk["flops_target"] = {"ratio": ratio, "count": "inference", "note": "measured when shipped"}
        adaptive["flops_target"] = {"ratio": ratio, "count": "inference", "note": ADAPTIVE_TARGET_NOTE}
        twin = topk_twin_name(router)
        print(f"{router}: {ratio:.3f} of the plain trunk  {write(router, adaptive, out)}  {write(twin, topk, out)}")


@contextlib.contextmanager
def _drip_pinned_at(segments: int) -> Iterator[None]:
    """Every DRIP reducer :func:`measured_ratio` builds pinned to ``segments`` per image."""
    original = sizing.make_reducer

    def make(*args: Any, **kwargs: Any) -> Any:
        reducer = original(*args, **kwargs)
        if isinstance(reducer, DripReducer):
            reducer.pin(segments)
        return reducer

    sizing.make_reducer = make
    try:
        yield
    finally:
        sizing.make_reducer = original


def write_gumbel_twins(image_dir: str, out: Path, bases: list[str]) -> None:
    """Write the twin of every shipped ``DRIP-ViT-<base>-...`` router config with its
    ``flops_target``: measured on :data:`GUMBEL_IMAGES` real images with the segments pinned at
    the prior's mean count (:func:`expected_segments`, whole segments, as the planned tokens are
    counted). The twin's count is per image and its weights decide it (an untrained MLP on a
    deep trunk's random tokens sits well off its prior), so the target is the compute of a
    predictor trained to its prior, on average over images."""
    for router in [n for n in list_models() if n.startswith("DRIP-ViT-")]:
        if not any(router.startswith(f"DRIP-{b}-") for b in bases):
            continue
        name, cfg = gumbel_twin_name(router), gumbel_twin_config(router)
        shape = shape_of(cfg)
        segments = int(expected_segments(shape.patches, 1.0 / cfg["vision_cfg"]["reducer_cfg"]["compression"]))
        with _drip_pinned_at(segments):
            ratio = measured_ratio(name, image_dir, images=GUMBEL_IMAGES, cfg=cfg)["ratio"]
        cfg["flops_target"] = {"ratio": round(ratio, 3), "count": "inference",
                               "note": f"the seed's Gumbel DRIP, twin of {router}: at the prior's mean count "
                                       f"({segments} segments; per image it varies)"}
        print(f"{name}: {ratio:.3f} of the plain trunk  {write(name, cfg, out)}")


def shape_of(cfg: dict[str, Any]) -> Shape:
    v = cfg["vision_cfg"]
    size = v.get("image_size", 224)
    return Shape(v.get("layers", 12), size // v["patch_size"], v["patch_size"], size)


def base_config(base: str) -> dict[str, Any]:
    cfg = copy.deepcopy(get_model_config(base) or open_clip.get_model_config(base))
    cfg["vision_cfg"]["trunk_cfg"] = dict(BASES[base])
    return cfg


def family_config(family: Family, base: str, knob: Any, target: float) -> dict[str, Any]:
    cfg = base_config(base)
    shape = shape_of(cfg)
    cfg["vision_cfg"]["reducer_cfg"] = family.reducer(shape, knob) or {**_drip_like(base), "predictor": "fixed"}
    stated: dict[str, Any] = {"ratio": target, "count": family.count}
    if family.image_size is not None:
        cfg["vision_cfg"]["image_size"] = family.image_size(shape, knob)
        stated["reference_image_size"] = shape.image_size
    if family.note:
        stated["note"] = family.note
    cfg["flops_target"] = stated
    return cfg


def solve(family: Family, base: str, target: float, image_dir: str, log: Callable[[str], None]
          ) -> tuple[dict[str, Any], float]:
    """Bisect the family's knob for the measured ratio nearest ``target``: (config, its ratio)."""
    knobs = family.knobs(shape_of(base_config(base)))
    measured: dict[int, float] = {}

    def ratio(i: int) -> float:
        if i not in measured:
            cfg = family_config(family, base, knobs[i], target)
            measured[i] = measured_ratio(f"{family.prefix}-{base}", image_dir, cfg=cfg)["ratio"]
            log(f"  {family.prefix}-{base} knob {knobs[i]}: {measured[i]:.3f}")
        return measured[i]

    lo, hi = 0, len(knobs) - 1  # ratio(lo) >= ratio(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ratio(mid) >= target else (lo, mid)
    best = min((lo, hi), key=lambda i: abs(ratio(i) - target))
    cfg = family_config(family, base, knobs[best], target)
    if abs(ratio(best) / target - 1.0) > 0.1:  # the knob's steps miss the target: state what it reaches
        cfg["flops_target"]["ratio"] = round(ratio(best), 3)
        cfg["flops_target"]["note"] = "; ".join(
            filter(None, [cfg["flops_target"].get("note"), f"the nearest to {target} its knob reaches"]))
    return cfg, ratio(best)


def write(name: str, cfg: dict[str, Any], out: Path) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=4) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Size each token-reduction family's configs to a FLOP ratio of the "
                                "plain trunk, measured on real images (see dtp_ds.eval.sizing)")
    p.add_argument("--image-dir", required=True, help="real images (e.g. data/synth/zeroshot)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--target", type=float, default=0.4, help=f"FLOP ratio to the plain trunk (tiny: {TINY_TARGET})")
    p.add_argument("--out", default=str(CONFIG_DIR), help="where the JSONs go (default: the shipped configs)")
    p.add_argument("--pin", action="store_true", help="instead: write the measured ratio into every shipped "
                   "config that states no flops_target")
    p.add_argument("--gumbel-twins", action="store_true", help=f"instead: write the seed's DRIP ({GUMBEL_PREFIX}-*, "
                   "DTP's Gumbel-Sigmoid MLP) twin of every DRIP router config of --bases, its target measured")
    p.add_argument("--router-selections", action="store_true", help=f"instead: set every DRIP router config of "
                   f"--bases to selection {ROUTER_SELECTION!r} and write its fixed-count twin ({TOPK_PREFIX}-*, "
                   "selection 'topk'), their targets measured")
    a = p.parse_args(argv)
    out = Path(a.out)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if a.router_selections:
        write_router_selections(a.image_dir, out, a.bases)
        return 0
    if a.gumbel_twins:
        write_gumbel_twins(a.image_dir, out, a.bases)
        return 0
    if a.pin:
        for name in list_models():
            cfg = get_model_config(name)
            if is_trunk_cfg(cfg["vision_cfg"]) and flops_target(name) is None:
                cfg["flops_target"] = {"ratio": round(measured_ratio(name, a.image_dir)["ratio"], 3),
                                       "count": "inference", "note": "measured when shipped"}
                print(f"{name}: pinned at {cfg['flops_target']['ratio']}  {write(name, cfg, out)}")
        return 0
    for base in a.bases:
        target = TINY_TARGET if base == "ViT-Tiny-8" else a.target
        for fam in a.families:
            cfg, got = solve(FAMILIES[fam], base, target, a.image_dir, log)
            name = f"{fam}-{base}"
            print(f"{name}: {got:.3f} of the plain trunk (target {target})  {write(name, cfg, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
