"""Weighted k-nearest-neighbour classification on frozen features (DINO's kNN evaluation, the
"NN" accuracy of augmentation-invariance pretraining): every query image votes with its ``k``
most similar bank images (cosine similarity of L2-normalised embeddings), each vote weighted
``exp(similarity / T)``; the class with the most weight is the prediction (k = 20, T = 0.07).

Features are the model's pooled image embedding (an open_clip model's ``encode_image``, a
trunk's forward: with no head, its pooled features). Images are split over ranks by
:mod:`dtp_ds.eval.classify`'s loader, the ranks step together (ZeRO-3 gathers parameters with
collectives: a rank without images runs a dummy batch), then features and labels are gathered in
rank order, so every rank holds the whole bank and the whole query set and computes the same
numbers one rank would.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtp_ds.data.shards import DataError
from dtp_ds.eval.classify import UNUSABLE, ClassSplit, _loader

Embed = Callable[[torch.Tensor], torch.Tensor]


def embedder(model: nn.Module) -> tuple[Embed, tuple[int, int]]:
    """(images -> pooled embedding, input size) of an open_clip model (``encode_image``) or an
    image trunk (its forward)."""
    if hasattr(model, "encode_image"):
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        return model.encode_image, (tuple(size) if isinstance(size, (tuple, list)) else (size, size))
    size = getattr(model, "img_size", 224)
    return model, (tuple(size) if isinstance(size, (tuple, list)) else (size, size))


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``(n_r, ...)`` rows (``n_r`` may differ) concatenated in rank order."""
    _, world = _rank_world()
    if world == 1:
        return x
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@torch.no_grad()
def image_features(model: nn.Module, transform: Callable, split: ClassSplit, device: torch.device,
                   input_dtype: torch.dtype = torch.float32, batch_size: int = 64, max_images: int | None = None,
                   workers: int = 2, normalize: bool = True, embed: Embed | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) fp32, labels (N,)) of the split's usable images, gathered over ranks
    (call on every rank); ``normalize``: L2-normalised rows. ``embed``: images -> embeddings
    (default :func:`embedder`'s)."""
    rank, world = _rank_world()
    default_embed, size = embedder(model)
    embed = embed or default_embed
    was_training = model.training
    model.eval()
    loader, _ = _loader(split, transform, rank, world, batch_size, max_images, workers, size)
    feats, labels, batches, dummy = [], [], iter(loader), None
    dim = None
    while True:
        batch = next(batches, None)
        more = torch.tensor([float(batch is not None)], device=device)
        if world > 1:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            break
        images = batch[0] if batch is not None else (dummy if dummy is not None else torch.zeros(1, 3, *size))
        dummy = images[:1] if dummy is None else dummy
        out = embed(images.to(device=device, dtype=input_dtype)).float()
        dim = out.shape[1]
        if batch is None:
            continue
        y = batch[1].to(device)
        ok = y != UNUSABLE
        feats.append(out[ok])
        labels.append(y[ok])
    model.train(was_training)
    if dim is None:  # no rank had an image: every rank saw the same (the loop's all-reduce)
        raise DataError(f"kNN split {split.name}: no images")
    mine = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    mine_y = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long, device=device)
    if normalize:
        mine = F.normalize(mine, dim=1)
    everyone, everyone_y = gather_rows(mine), gather_rows(mine_y)
    if not everyone.shape[0]:
        raise DataError(f"kNN split {split.name}: no usable image")
    return everyone, everyone_y


@torch.no_grad()
def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> tuple[float, float]:
    """(top-1 %, top-5 %) of the weighted kNN vote of every query (rows L2-normalised: the dot
    product is the cosine similarity), ``chunk`` queries at a time. A class no neighbour voted for
    is never a hit (with k < 5 neighbours DINO's sort would rank such classes arbitrarily)."""
    k = min(k, bank.shape[0])
    top = min(5, num_classes)
    hits1 = hits5 = 0
    for start in range(0, queries.shape[0], chunk):
        q, y = queries[start:start + chunk], query_labels[start:start + chunk]
        sims, idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[idx], (sims.double() / temperature).exp())
        weight, ranked = votes.topk(top, dim=1)
        hit = (ranked == y[:, None]) & (weight > 0)
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(dim=1).sum())
    n = max(1, queries.shape[0])
    return 100.0 * hits1 / n, 100.0 * hits5 / n


def knn_eval(model: nn.Module, transform: Callable, bank: ClassSplit, query: ClassSplit, device: torch.device,
             input_dtype: torch.dtype = torch.float32, batch_size: int = 64, max_images: int | None = None,
             workers: int = 2, k: int = 20, temperature: float = 0.07, bank_max_images: int | None = None,
             prefix: str = "knn_", embed: Embed | None = None) -> dict[str, float]:
    """``PREFIX``top1 / top5 (%) of ``query``'s images classified by their neighbours in
    ``bank`` (the training split), and images, bank, classes, chance_top1; call on every rank."""
    bank_f, bank_y = image_features(model, transform, bank, device, input_dtype, batch_size, bank_max_images,
                                    workers, embed=embed)
    query_f, query_y = image_features(model, transform, query, device, input_dtype, batch_size, max_images, workers,
                                      embed=embed)
    classes = max(bank.num_classes or 0, query.num_classes or 0, int(bank_y.max()) + 1, int(query_y.max()) + 1)
    top1, top5 = knn_classify(bank_f, bank_y, query_f, query_y, classes, k, temperature)
    return {f"{prefix}top1": top1, f"{prefix}top5": top5, f"{prefix}images": int(query_f.shape[0]),
            f"{prefix}bank": int(bank_f.shape[0]), f"{prefix}classes": classes,
            f"{prefix}chance_top1": 100.0 / classes}
