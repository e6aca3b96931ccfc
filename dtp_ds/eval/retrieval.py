"""Image-text retrieval: recall@K in both directions over WebDataset shards whose samples carry
one image and one or more captions (COCO / Flickr30k test splits in img2dataset layout).

A sample's captions are its ``json``'s ``"captions"`` list where it has one, else the lines of
its ``txt`` (several captions separated by newlines; blank lines dropped). The standard
definitions (CLIP's, clip_benchmark's):

- **image -> text** recall@K: the share of images for which at least one of their own captions
  is among the K captions most similar to the image;
- **text -> image** recall@K: the share of captions whose image is among the K images most
  similar to the caption.

Similarity is the dot product of L2-normalised embeddings (``encode_image`` /
``encode_text`` with ``normalize=True``), in fp32 whatever the model's precision. K larger than
the candidates counts every candidate. Samples whose image or captions cannot be read
(:class:`~dtp_ds.data.decode.BadSample`) are left out and counted (``unusable``).

Under a process group each rank encodes every ``world``-th sample and the features are gathered
(the ranks need not step together: this runs plain models, not ZeRO-3 engines).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from dtp_ds.data.decode import IMAGE_EXTS, BadSample, decode_field, decode_image
from dtp_ds.data.shards import Bad, DataError, read_shard, resolve_shards
from dtp_ds.eval.boundary_quality import BoundaryQuality
from dtp_ds.models import record_forward

KS = (1, 5, 10)


@dataclass
class RetrievalSet:
    name: str
    shards: list[str]


def retrieval_set(spec: str) -> RetrievalSet:
    """A retrieval set from a shard spec ('DIR/{00000..00004}.tar', '::'-joined sources) or a
    directory of ``*.tar`` shards; :class:`DataError` naming the spec when no shard exists."""
    if os.path.isdir(spec):
        tars = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        if not tars:
            raise DataError(f"retrieval set {spec}: a directory without *.tar shards (give the shards, e.g. "
                            f"'DIR/{{00000..00004}}.tar', in img2dataset's webdataset layout)")
        return RetrievalSet(os.path.basename(os.path.normpath(spec)), tars)
    shards, _ = resolve_shards(spec)
    return RetrievalSet(os.path.basename(os.path.dirname(os.path.abspath(shards[0]))), shards)


def captions_of(sample: dict) -> list[str]:
    """A raw sample's captions: its ``json``'s ``"captions"`` list if it has one, else the
    non-blank lines of its ``txt``; :class:`BadSample` when there is none."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        found = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(found, list):
            caps = [str(c).strip() for c in found if str(c).strip()]
            if caps:
                return caps
    text = decode_field(sample, "txt")
    caps = [line.strip() for line in text.splitlines() if line.strip()]
    if not caps:
        raise BadSample("empty caption", "no_caption")
    return caps


class _Samples(IterableDataset):
    """(index, image, captions, why) of the samples that fall to this rank and loader worker
    (sample i goes to slot ``i % (world * workers)``), the first ``max_images`` only. ``image``
    is ``None`` (and ``why`` says why) for a sample that cannot be used, or a shard that cannot
    be read (index -1)."""

    def __init__(self, shards: list[str], transform: Callable, rank: int, world: int,
                 max_images: int | None) -> None:
        self.shards, self.transform, self.rank, self.world, self.max_images = shards, transform, rank, world, max_images

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor | None, list[str], str]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * nw + wid, self.world * nw
        i = 0
        for shard_no, shard in enumerate(self.shards):
            for sample in read_shard(shard):
                if isinstance(sample, Bad):  # the shard's own failure: reported once, by the first slot
                    if shard_no % slots == slot:
                        yield -1, None, [], f"{sample.shard}: {sample.kind}: {sample.reason}"
                    continue
                if self.max_images is not None and i >= self.max_images:
                    return
                i += 1
                if (i - 1) % slots == slot:
                    yield self._decode(i - 1, sample)

    def _decode(self, index: int, sample: dict) -> tuple[int, torch.Tensor | None, list[str], str]:
        try:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise BadSample("no image", "no_image")
            caps = captions_of(sample)
            image = decode_image(sample[ext])
        except BadSample as e:
            return index, None, [], f"{sample.get('__url__')}: sample {sample.get('__key__')}: {e}"
        return index, self.transform(image), caps, ""


def _collate(items: list) -> list:
    return items


@dataclass
class RetrievalFeatures:
    """Every usable sample's image embedding (rows in sample order), every caption's embedding
    (grouped by image, in order), and which image each caption belongs to (a row of ``images``)."""

    images: torch.Tensor  # (N, D) fp32, L2-normalised
    texts: torch.Tensor  # (M, D)
    text_image: torch.Tensor  # (M,) long
    unusable: int
    first_failure: str | None
    quality: dict[str, float]


@torch.no_grad()
def encode_set(model: nn.Module, tokenizer: Callable, preprocess: Callable, rset: RetrievalSet,
               device: torch.device, input_dtype: torch.dtype = torch.float32, batch_size: int = 64,
               max_images: int | None = None, workers: int = 2) -> RetrievalFeatures:
    """The embeddings of ``rset``'s images and captions (on every rank, gathered)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    was_training = model.training
    model.eval()
    loader = DataLoader(_Samples(rset.shards, preprocess, rank, world, max_images), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, generator=torch.Generator())
    indices: list[int] = []
    image_feats: list[torch.Tensor] = []
    captions: list[list[str]] = []
    failures: list[str] = []
    quality = BoundaryQuality("cpu")
    for batch in loader:
        failures += [why for _, image, _, why in batch if image is None]
        usable = [(i, image, caps) for i, image, caps, _ in batch if image is not None]
        if not usable:
            continue
        images = torch.stack([image for _, image, _ in usable]).to(device=device, dtype=input_dtype)
        with record_forward() as rec:
            image_feats.append(model.encode_image(images, normalize=True).float().cpu())
        for out in rec:  # the groups this forward's reducer made, if it groups patches (no objects known)
            if out.groups is not None:
                quality.add(out.groups, out.scores, [None] * len(usable), images)
        indices += [i for i, _, _ in usable]
        captions += [caps for _, _, caps in usable]
    flat = [c for caps in captions for c in caps]
    text_feats = [model.encode_text(tokenizer(flat[b:b + batch_size]).to(device), normalize=True).float().cpu()
                  for b in range(0, len(flat), batch_size)]
    model.train(was_training)
    mine = {"indices": indices, "counts": [len(c) for c in captions],  # (empty parts are never indexed)
            "images": torch.cat(image_feats) if image_feats else torch.zeros(0),
            "texts": torch.cat(text_feats) if text_feats else torch.zeros(0),
            "failures": failures, "quality": quality.sums}
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    # reassemble in sample order: ranks' images by their global index, each with its captions
    rows, texts = [], []
    for part in parts:
        starts = np.concatenate([[0], np.cumsum(part["counts"])]).astype(int)
        for j, index in enumerate(part["indices"]):
            rows.append((index, part["images"][j], part["texts"][starts[j]:starts[j + 1]]))
    rows.sort(key=lambda r: r[0])
    failures = [f for part in parts for f in part["failures"]]
    total = BoundaryQuality("cpu")
    for part in parts:
        total.sums += part["quality"]
    if not rows:
        raise DataError(f"retrieval set {rset.name} ({os.path.dirname(rset.shards[0])}): no usable sample ("
                        + (f"{len(failures)} unusable; the first: {failures[0]}" if failures else "it holds none")
                        + ")")
    images = torch.stack([r[1] for r in rows])
    texts = torch.cat([r[2] for r in rows])
    text_image = torch.cat([torch.full((len(r[2]),), n, dtype=torch.long) for n, r in enumerate(rows)])
    return RetrievalFeatures(images, texts, text_image, len(failures), failures[0] if failures else None,
                             total.result())


def recall_at_k(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = KS,
                chunk: int = 1024) -> dict[str, float]:
    """Recall@K (%) both ways for L2-normalised ``images`` (N, D) and ``texts`` (M, D), caption
    m belonging to image ``text_image[m]``: ``image_to_text_rK``, ``text_to_image_rK``, and
    ``mean_recall`` (the mean of them all). Scored in chunks of ``chunk`` rows."""
    images, texts, text_image = images.float(), texts.float(), text_image.long()
    n, m = len(images), len(texts)
    i2t = torch.zeros(len(ks), dtype=torch.float64)
    t2i = torch.zeros(len(ks), dtype=torch.float64)
    top_t, top_i = min(max(ks), m), min(max(ks), n)
    for b in range(0, n, chunk):
        best = (images[b:b + chunk] @ texts.T).topk(top_t, dim=1).indices  # (c, top_t) caption indices
        own = text_image[best] == torch.arange(b, b + len(best))[:, None]
        i2t += torch.tensor([own[:, :k].any(dim=1).sum().item() for k in ks], dtype=torch.float64)
    for b in range(0, m, chunk):
        best = (texts[b:b + chunk] @ images.T).topk(top_i, dim=1).indices  # (c, top_i) image indices
        own = best == text_image[b:b + chunk, None]
        t2i += torch.tensor([own[:, :k].any(dim=1).sum().item() for k in ks], dtype=torch.float64)
    out = {f"image_to_text_r{k}": 100 * float(i2t[j]) / n for j, k in enumerate(ks)}
    out.update({f"text_to_image_r{k}": 100 * float(t2i[j]) / m for j, k in enumerate(ks)})
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def retrieval_eval(model: nn.Module, tokenizer: Callable, preprocess: Callable, rset: RetrievalSet,
                   device: torch.device, input_dtype: torch.dtype = torch.float32, batch_size: int = 64,
                   max_images: int | None = None, workers: int = 2, prefix: str = "retrieval_",
                   ks: Sequence[int] = KS) -> dict[str, float]:
    """``PREFIX``image_to_text_rK / text_to_image_rK / mean_recall (%), images, texts, unusable,
    and for reducers that group patches the groups' compression (``PREFIX``compression, ...)."""
    f = encode_set(model, tokenizer, preprocess, rset, device, input_dtype, batch_size, max_images, workers)
    out = {prefix + k: v for k, v in recall_at_k(f.images, f.texts, f.text_image, ks).items()}
    out.update({f"{prefix}images": len(f.images), f"{prefix}texts": len(f.texts), f"{prefix}unusable": f.unusable})
    out.update({prefix + k: v for k, v in f.quality.items()})
    return out


def describe(name: str, one: dict[str, float], prefix: str = "retrieval_", ks: Sequence[int] = KS) -> str:
    """One line for one set's :func:`retrieval_eval` result."""
    i2t = " ".join(f"R@{k} {one[f'{prefix}image_to_text_r{k}']:.2f}" for k in ks)
    t2i = " ".join(f"R@{k} {one[f'{prefix}text_to_image_r{k}']:.2f}" for k in ks)
    line = (f"retrieval {name} ({one[prefix + 'images']} images, {one[prefix + 'texts']} captions): "
            f"image->text {i2t}; text->image {t2i}")
    if prefix + "compression" in one:
        line += f", eval compression {one[prefix + 'compression']:.2f}"
    if one[prefix + "unusable"]:
        line += f", {one[prefix + 'unusable']} unusable"
    return line
