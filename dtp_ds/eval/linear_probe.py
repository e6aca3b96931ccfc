"""Linear probe: a linear classifier on a frozen model's features, trained on one split and
scored (top-1 / top-5) on another: the "LP" accuracy of augmentation-invariance pretraining.

    tools/linear_probe LOGS/NAME --train 'data/synth/classify/train/{00000..00019}.tar' \
        --val data/synth/classify/val
    tools/linear_probe ViT-Tiny-8 --random-init --train ... --val ...     (an untrained baseline)

The features are the model's pooled image embedding (:func:`dtp_ds.eval.knn.image_features`, not
normalised), standardised with the training split's mean and deviation. The classifier is a
multinomial logistic regression fitted full-batch with L-BFGS (deterministic, no learning rate
to tune; MoCo v3's probe is SGD over 90 epochs of augmented images, which a few-thousand-image
split does not need); its L2 weight is chosen from a grid on a held-out fifth of the training
split, then the probe is refitted on the whole split. Features sit in memory: fine up to a few
hundred thousand images.

Under several ranks (``deepspeed --num_gpus N tools/linear_probe ...``) the images are split
over ranks and the features gathered; every rank fits the same probe.

The CLI sets torch's intra-op threads explicitly (``--threads``, default: the CPUs this process
may run on, ``os.sched_getaffinity``): L-BFGS's full-batch matrix products otherwise take torch's
default, which on a shared or containerised machine can be more threads than the process has
cores, and they then wait on each other.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from dtp_ds.data.shards import DataError
from dtp_ds.eval.classify import ClassSplit, class_split
from dtp_ds.eval.knn import Embed, embedder, image_features
from dtp_ds.models.registry import renamed_model

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT = 0.2


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor centred and scaled by the training features' mean and deviation."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 200) -> nn.Linear:
    """A linear layer minimising mean cross-entropy + ``l2`` * |W|^2 over ``(x, y)`` (full batch,
    L-BFGS with a strong-Wolfe line search; the bias is not penalised)."""
    layer = torch.nn.utils.skip_init(nn.Linear, x.shape[1], num_classes, device=x.device)  # draws no random number
    nn.init.zeros_(layer.weight)  # a convex problem: the start changes nothing but the iterations
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1 %, top-5 %)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    n = max(1, len(y))
    return 100.0 * float(hit[:, 0].sum()) / n, 100.0 * float(hit.any(1).sum()) / n


def holdout_split(n: int, fraction: float = HOLDOUT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded random ``fraction`` held out (at least one)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, int(round(n * fraction)))
    return order[held:], order[:held]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, l2_grid: Sequence[float] = L2_GRID, holdout: float = HOLDOUT, seed: int = 0,
                 max_iter: int = 200, prefix: str = "probe_") -> dict[str, Any]:
    """Fit on ``train`` (L2 weight chosen on a held-out part of it: best top-1, then lowest
    loss), refit on all of it, score ``val``: ``PREFIX``top1 / top5 / l2 / holdout_top1 /
    train_top1 / images / classes / chance_top1."""
    if len(l2_grid) > 1 and train_x.shape[0] < 2:
        raise ValueError("choosing the L2 weight needs at least two training images")
    x, vx = standardise(train_x.float(), val_x.float())
    best: tuple[float, float, float] | None = None  # (top-1, -loss, l2)
    if len(l2_grid) > 1:
        fit, held = holdout_split(x.shape[0], holdout, seed)
        fit, held = fit.to(x.device), held.to(x.device)
        for l2 in l2_grid:
            layer = fit_logistic(x[fit], train_y[fit], num_classes, l2, max_iter)
            with torch.no_grad():
                logits = layer(x[held])
            score = (accuracy(logits, train_y[held])[0], -float(F.cross_entropy(logits, train_y[held])), l2)
            best = score if best is None or score[:2] > best[:2] else best
    l2 = best[2] if best is not None else l2_grid[0]
    layer = fit_logistic(x, train_y, num_classes, l2, max_iter)
    with torch.no_grad():
        top1, top5 = accuracy(layer(vx), val_y)
        train_top1 = accuracy(layer(x), train_y)[0]
    return {f"{prefix}top1": top1, f"{prefix}top5": top5, f"{prefix}l2": l2,
            f"{prefix}holdout_top1": best[0] if best is not None else math.nan, f"{prefix}train_top1": train_top1,
            f"{prefix}images": int(val_x.shape[0]), f"{prefix}train_images": int(train_x.shape[0]),
            f"{prefix}classes": num_classes, f"{prefix}chance_top1": 100.0 / num_classes}


def linear_probe_eval(model: nn.Module, transform: Callable, train: ClassSplit, val: ClassSplit,
                      device: torch.device, input_dtype: torch.dtype = torch.float32, batch_size: int = 64,
                      max_images: int | None = None, train_max_images: int | None = None, workers: int = 2,
                      l2_grid: Sequence[float] = L2_GRID, embed: Embed | None = None,
                      prefix: str = "probe_") -> dict[str, Any]:
    """The probe of ``model``'s frozen features (any model :func:`dtp_ds.eval.knn.embedder`
    knows, or ``embed``), trained on ``train``, scored on ``val``; call on every rank."""
    tx, ty = image_features(model, transform, train, device, input_dtype, batch_size, train_max_images, workers,
                            normalize=False, embed=embed)
    vx, vy = image_features(model, transform, val, device, input_dtype, batch_size, max_images, workers,
                            normalize=False, embed=embed)
    classes = max(train.num_classes or 0, val.num_classes or 0, int(ty.max()) + 1, int(vy.max()) + 1)
    return linear_probe(tx, ty, vx, vy, classes, l2_grid, prefix=prefix)


def eval_transform(model: nn.Module) -> Callable:
    """The evaluation preprocessing of an open_clip model (its own config) or an image trunk
    (resize + centre crop to its input size, CLIP's mean / std, as the tasks train trunks)."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if cfg:
        return open_clip.image_transform(cfg["size"], False, cfg["mean"], cfg["std"], cfg.get("resize_mode"),
                                         cfg.get("interpolation"))
    _, size = embedder(model)
    return open_clip.image_transform(size, False, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                                     interpolation="bicubic")


# --- the CLI


class ProbeError(Exception):
    """What the user gave cannot be probed; the message names the fix."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/linear_probe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run directory, checkpoint directory or .safetensors export of any task, or an "
                                  "open_clip / dtp_ds model name with --pretrained FILE or --random-init")
    p.add_argument("--pretrained", help="with a model name: its weights (a file or an open_clip pretrained tag)")
    p.add_argument("--random-init", action="store_true", help="with a model name: untrained weights (a baseline)")
    p.add_argument("--train", required=True, help="the probe's training split: a class-folder directory or cls "
                                                  "shards ('DIR/{00000..00019}.tar')")
    p.add_argument("--val", required=True, help="the split it is scored on (class folders or cls shards)")
    p.add_argument("--l2", type=float, nargs="+", default=list(L2_GRID),
                   help="L2 weights to choose from on a held-out fifth of --train (one: no choice)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, help="the first N images of --val")
    p.add_argument("--train-max-images", type=int, help="the first N images of --train")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    p.add_argument("--device", help="default: cuda where there is one, else cpu")
    p.add_argument("--out", help="write the result as JSON to this file")
    p.add_argument("--seed", type=int, default=0, help="the random initialisation's seed (--random-init)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the features and the fit (default: the CPUs this process may "
                        "run on, os.sched_getaffinity)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def load_model(a: argparse.Namespace, checkpoints: ModuleType | None) -> tuple[nn.Module, str]:
    """(model in eval mode on the CPU, a description)."""
    if a.random_init:
        if a.pretrained or os.path.exists(a.source):
            raise ProbeError("--random-init goes with a model name alone (no --pretrained, no checkpoint)")
        if a.source not in open_clip.list_models():
            raise ProbeError(renamed_model(a.source) or
                             f"{a.source}: not an open_clip or dtp_ds model name (open_clip.list_models())")
        torch.manual_seed(a.seed)
        return open_clip.create_model(a.source).eval(), f"{a.source} (random init, seed {a.seed})"
    from dtp_ds.eval.evaluate import EvaluateError, load_source

    if checkpoints is None and os.path.exists(a.source):
        raise ProbeError(f"{a.source}: reading checkpoints needs dtp_ds.train's reader: run tools/linear_probe")
    try:
        src = load_source(a.source, a.pretrained, checkpoints, any_task=True)
    except EvaluateError as e:
        raise ProbeError(str(e)) from e
    return src.model.eval(), f"{src.name} ({src.kind} {src.path})"


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_of(path: str, flag: str) -> ClassSplit:
    try:
        return class_split(path)
    except (ValueError, DataError) as e:
        raise ProbeError(f"{flag} {path}: {e}") from e


def main(argv: list[str] | None = None, checkpoints: ModuleType | None = None) -> int:
    """The CLI. ``checkpoints``: the checkpoint reader (``dtp_ds.train.export``), given by the
    tool (dtp_ds.eval sits below dtp_ds.train)."""
    p = parser()
    a = p.parse_args(argv)
    threads = cpu_count() if a.threads is None else a.threads
    if threads < 1:
        p.error(f"--threads {a.threads}: give at least 1 (default: {cpu_count()}, the CPUs this process may run on)")
    torch.set_num_threads(threads)
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from dtp_ds.cluster.process_group import init_process_group

        init_process_group()
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        model, what = load_model(a, checkpoints)
        train, val = split_of(a.train, "--train"), split_of(a.val, "--val")
        res = linear_probe_eval(model.to(device), eval_transform(model), train, val, device,
                                batch_size=a.batch_size, max_images=a.max_images,
                                train_max_images=a.train_max_images, workers=a.workers, l2_grid=a.l2)
    except (ProbeError, DataError) as e:
        print(f"tools/linear_probe: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"linear probe of {what}: top-1 {res['probe_top1']:.2f}% top-5 {res['probe_top5']:.2f}% on "
              f"{res['probe_images']} images of {val.name} (chance {res['probe_chance_top1']:.2f}%), trained on "
              f"{res['probe_train_images']} images of {train.name} (L2 {res['probe_l2']:g}, held-out top-1 "
              f"{res['probe_holdout_top1']:.2f}%, train top-1 {res['probe_train_top1']:.2f}%)")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"source": a.source, "train": a.train, "val": a.val, **res}, f, indent=1)
    return 0
