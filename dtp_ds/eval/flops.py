"""FLOP counts of CLIP image towers (and whole CLIP models), token reducers at a pinned rate.

Two counters, both in the "1 multiply-add = 1 FLOP" convention:

* ``gflops`` (primary): ``torch.utils.flop_counter.FlopCounterMode`` halved to that convention;
  it counts the attention matmuls too;
* ``gflops_fvcore``: fvcore's count (the users' table). It does not count attention itself
  (``scaled_dot_product_attention`` is an op fvcore has no handle for), only the projections
  around it.

A reducer's cost depends on how many tokens it keeps. Counting pins every reducer
(:class:`dtp_ds.models.pinned_tokens`) to as many tokens as the reducer plans for at its
configured rate (:meth:`TokenReducer.default_rate`, DRIP: 1 / compression) or at
``boundary_rate`` (e.g. the rate a run's evaluation ran at, from its ``metrics.jsonl``:
``zeroshot_boundary_rate``): the fewest tokens any block sees in
:meth:`TokenReducer.planned_tokens`, CLS aside. ``segments`` gives that count directly (what a
run measured: patches / compression). A fractional count is the linear interpolation of the
two whole counts around it. Reducers without a rate are counted as they run.

Counting runs with autograd on. Under ``torch.no_grad()`` open_clip's plain ViTs take
``nn.MultiheadAttention``'s fused inference path, which neither counter sees into: the
q/k/v and output projections vanish from the count (see ``models/README.md``), which is where
the users' plain ViT-B-32 figure comes from while their DRIP count (timm-style attention built
from ``nn.Linear``) kept them. ``--no-grad`` reproduces it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dtp_ds
from dtp_ds.eval.run_metrics import boundary_rate_arg
from dtp_ds.models import VisionTransformer, pinned_tokens, trunks

with warnings.catch_warnings():
    # fvcore scripts a helper at import; torch 2.x flags torch.jit.script as deprecated.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

DEFAULT_MODELS = ["ViT-B-32", "DRIP-ViT-B-32-2x", "DRIP-ViT-B-32-4x", "DRIP-ViT-B-32-10x"]


def fvcore_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return int(analysis.total())


def torch_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    return int(counter.get_total_flops()) // 2  # FlopCounterMode counts 2 per multiply-add


def _count(model: nn.Module, image: torch.Tensor, text: torch.Tensor | None, no_grad: bool) -> dict[str, float]:
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        result = {"gflops": torch_macs(model.visual, (image,)) / 1e9,
                  "gflops_fvcore": fvcore_macs(model.visual, (image,)) / 1e9}
        if text is not None:
            result["clip_gflops"] = torch_macs(model, (image, text)) / 1e9
            result["clip_gflops_fvcore"] = fvcore_macs(model, (image, text)) / 1e9
    return result


def count_flops(
    model: nn.Module,
    image_size: tuple[int, int],
    context_length: int | None = None,
    boundary_rate: float | None = None,
    no_grad: bool = False,
    segments: float | None = None,
) -> dict[str, Any]:
    """FLOPs of one sample through ``model.visual`` (and through the whole CLIP model when
    ``context_length`` is given); reducers pinned to ``segments`` kept patch tokens per sample,
    else to what they plan for at ``boundary_rate`` (None: their configured rate).
    The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return _count_flops(model, image_size, context_length, boundary_rate, no_grad, segments)
    finally:
        model.train(was_training)


def _rated_trunk(model: nn.Module) -> VisionTransformer | None:
    """The trunk whose reducer has a rate to pin (FLOPs then depend on it); None if none."""
    rated = [t for t in trunks(model) if t.reducer.default_rate() is not None]
    if len(rated) > 1:
        raise ValueError(f"{len(rated)} trunks with a rated token reducer; FLOP counting pins one")
    return rated[0] if rated else None


def _count_flops(model: nn.Module, image_size: tuple[int, int], context_length: int | None,
                 boundary_rate: float | None, no_grad: bool, segments: float | None) -> dict[str, Any]:
    device = next(model.parameters()).device
    image = torch.randn(1, 3, *image_size, device=device)
    text = None if context_length is None else torch.randint(0, 49408, (1, context_length), device=device)
    trunk = _rated_trunk(model)
    patches = math.prod(s // p for s, p in zip(image_size, _patch_size(model)))
    if trunk is None:  # nothing to pin: a rate given for the table's reducer rows does not apply
        planned = [t.reducer.planned_tokens(t.num_patches, t.depth) for t in trunks(model)]
        tokens = min((min(p) for p in planned if p), default=1.0 + patches)
        return {**_count(model, image, text, no_grad), "boundary_rate": None,
                "compression": patches / (tokens - 1.0), "tokens": tokens}
    patches, rate = trunk.num_patches, None
    if segments is None:
        rate = boundary_rate if boundary_rate is not None else trunk.reducer.default_rate()
        segments = min(trunk.reducer.planned_tokens(patches, trunk.depth, rate)) - 1.0
    if not 1.0 <= segments <= patches:
        raise ValueError(f"{segments} kept tokens per sample: a {patches}-patch model keeps 1 to {patches}")
    low, frac = math.floor(segments), segments - math.floor(segments)
    with pinned_tokens(model, low):
        result = _count(model, image, text, no_grad)
    if frac > 1e-9:
        with pinned_tokens(model, low + 1):
            high = _count(model, image, text, no_grad)
        result = {k: (1.0 - frac) * v + frac * high[k] for k, v in result.items()}
    return {**result, "boundary_rate": rate, "compression": patches / segments, "tokens": 1 + segments}


def _patch_size(model: nn.Module) -> tuple[int, int]:
    visual = model.visual
    found = trunks(visual)
    if found:
        return (found[0].patch_size,) * 2
    patch = getattr(visual, "patch_size", None)
    if patch is None:
        raise ValueError("cannot tell the patch size of this image tower")
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)


def model_flops(
    name: str, boundary_rate: float | None = None, whole_model: bool = True, no_grad: bool = False
) -> dict[str, Any]:
    """Build ``name`` (random weights, CPU, fp32) and count it; one table row."""
    model = dtp_ds.create_model(name)
    size = model.visual.image_size  # open_clip keeps (H, W) on both plain and timm towers
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    context_length = model.context_length if whole_model else None
    row = {"model": name, "resolution": image_size[0], "patch_size": _patch_size(model)[0]}
    row.update(count_flops(model, image_size, context_length, boundary_rate, no_grad))
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The human table: one line per model."""
    cols = [
        ("model", "model", "{}"),
        ("gflops", "GFLOPs", "{:.2f}"),
        ("gflops_fvcore", "fvcore", "{:.2f}"),
        ("clip_gflops", "CLIP GFLOPs", "{:.2f}"),
        ("clip_gflops_fvcore", "CLIP fvcore", "{:.2f}"),
        ("resolution", "resolution", "{}"),
        ("patch_size", "patch", "{}"),
        ("boundary_rate", "rate", "{:.3f}"),
        ("compression", "compression", "{:.2f}"),
        ("tokens", "tokens", "{:.1f}"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI behind ``tools/flops``."""
    parser = argparse.ArgumentParser(
        description="GFLOPs (1 multiply-add = 1 FLOP; torch's FlopCounterMode, attention included, and fvcore's "
        "count) of CLIP image towers and whole models; token reducers at the tokens they plan for at their "
        "configured rate (DRIP: 1/compression) or --boundary-rate's.",
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model names (default: %(default)s)")
    parser.add_argument("--boundary-rate", default=None, metavar="RATE|RUN_DIR",
                        help="count reducer models at the tokens they keep at this rate (DRIP: boundary rate), "
                        "instead of each model's configured one (DRIP: 1/compression): a number, or a run "
                        "directory (or its metrics.jsonl): the rate its last evaluation ran at (the "
                        "deterministic eval rule on real images), else its last logged training rate")
    parser.add_argument("--image-only", action="store_true", help="skip the whole-CLIP counts (faster)")
    parser.add_argument("--no-grad", action="store_true",
                        help="count under torch.no_grad(): reproduces the count that misses "
                        "nn.MultiheadAttention's projections in plain open_clip ViTs (see module doc)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    try:
        rate = boundary_rate_arg(args.boundary_rate)
    except (OSError, ValueError) as e:
        parser.error(f"--boundary-rate {args.boundary_rate}: {e}")
    if rate is not None and not 0.0 <= rate <= 1.0:
        parser.error("--boundary-rate must be in [0, 1]")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights per model
    rows = [model_flops(n, rate, not args.image_only, args.no_grad) for n in args.models]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print("GFLOPs: torch FlopCounterMode / 2 (1 multiply-add = 1 FLOP, attention counted), image tower; "
              "fvcore: the same convention, attention matmuls not counted. Reducer rows at the tokens the "
              "reducer plans for at that rate (DRIP: rate x (patches - 1) + 1 segments, + CLS).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
