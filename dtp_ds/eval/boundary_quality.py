"""How well a reducer's groups follow content, on images whose shapes are known (the synthetic
splits). Any reducer that reports the group each patch ended in (``TowerOutput.groups``, e.g.
DRIP's segments) is measured; the probability spread needs its per-patch ``scores`` too.

- **segment purity** (``purity``): the share of a segment's patches on its majority side (shape
  or background), averaged over all segments of all images. Evenly spaced boundaries at the same
  per-image count give the reference (``purity_even``): one segment per image scores the
  background's share, and so does the reference at that count.
- **purity by patch** (``purity_by_patch``, ``purity_by_patch_even``): the share of all patches
  that lie on their segment's majority side, i.e. each segment weighted by its size. The
  stricter figure: averaged over segments, uneven segmentations win for free (random pooling
  at rate 0.25 makes many one-patch segments, pure by construction, and scores 0.952 against
  0.941 for even spacing; by patch it scores 0.917 against 0.939,
  ``tests/unit/test_boundary_rules.py``).
- **probability spread**: ``q95 - q05`` of the boundary probabilities over all patches; a
  predictor that outputs its prior everywhere has a spread near 0.
- **compression**: patches / segments over all images, as evaluation really ran, and the
  boundary rate that makes that many segments (what ``tools/flops --boundary-rate RUN_DIR``
  counts at).
- **segments per image** (``segments_mean``, ``segments_std``, ``segments_cv`` = std / mean, the
  population std over images): whether the count follows content (a fixed top-k budget gives
  std 0).
- **does the count follow scene complexity**: Pearson's r of an image's segment count with two
  measures of its content, each with its 95% Fisher-z interval over images
  (``segments_edges_r``, ``_lo``, ``_hi``; ``segments_outline_r``, ...): ``edges``, the image's
  mean luminance gradient (|dx| + |dy| of the input as the model saw it: texture, outlines, more
  objects all raise it; any split), and ``outline``, where objects are known, the number of
  places in raster order where the patch label changes (shape to background or back: where a
  boundary that follows content belongs). Not reported for a fixed count (no variance).

Accumulated as sums (and a probability histogram) so ranks can all-reduce them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dtp_ds.bench.stats import correlation_from_sums
from dtp_ds.models.boundary import regular_boundaries
from dtp_ds.models.segments import segment_ids

HIST_BINS = 1000
# sums: segment purity, the same for even boundaries, labelled segments, majority patches,
# the same for even boundaries, labelled patches; patches, segments, images, squared segments
# per image (sums, so ranks all-reduce them and the std still comes out exact); then per
# complexity measure (edges, outline) the pair sums of (segments, measure): images, sum n, sum x,
# sum n^2, sum x^2, sum n x
_BASE = 10
COMPLEXITY = ("edges", "outline")
_FIELDS = _BASE + 6 * len(COMPLEXITY)


def edge_density(images: torch.Tensor) -> torch.Tensor:
    """(B,) each image's mean luminance gradient, |dx| + |dy| averaged over pixels, of ``images``
    (B, C, H, W) as the model saw them."""
    gray = images.detach().float().mean(dim=1)
    return (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean(dim=(1, 2)) + \
        (gray[:, 1:, :] - gray[:, :-1, :]).abs().mean(dim=(1, 2))


def label_changes(labels: torch.Tensor) -> int:
    """How often the patch label changes along raster order (``labels`` (L,) bool)."""
    return int((labels[1:] != labels[:-1]).sum())


def segment_purity_sums(ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(sum over segments of their purity, patches on their segment's majority side, number of
    segments) for one image: ``ids`` (L,) segment ids, ``labels`` (L,) bool (patch mostly on a
    shape). Ids need not be contiguous or ordered (any grouping reducer's)."""
    ids = torch.unique(ids.long().cpu(), return_inverse=True)[1]
    n = int(ids.max()) + 1
    size = torch.bincount(ids, minlength=n).double()
    on_shape = torch.bincount(ids, weights=labels.double().cpu(), minlength=n)
    majority = torch.maximum(on_shape, size - on_shape)
    return float((majority / size).sum()), float(majority.sum()), n


def _pair(n: float, x: float) -> torch.Tensor:
    return torch.tensor([1, n, x, n * n, x * x, n * x], dtype=torch.float64)


class BoundaryQuality:
    """Accumulates purity, its even-spacing reference, compression and the probability
    histogram over batches; :meth:`result` after an optional all-reduce of :attr:`sums`."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(_FIELDS + HIST_BINS, dtype=torch.float64, device=device)

    def add(self, groups: torch.Tensor, scores: torch.Tensor | None, labels: Sequence[np.ndarray | None],
            images: torch.Tensor | None = None) -> None:
        """One batch: ``groups`` (B, L) the group of every patch as the forward used them,
        ``scores`` (B, L) the reducer's per-patch probabilities (``None``: none, no spread),
        ``labels[b]`` the patch labels of image ``b`` (``None``: no objects known, counted in
        compression only), ``images`` (B, C, H, W) the forward's input (``None``: no edge measure)."""
        groups = groups.long().cpu()
        length = groups.shape[-1]
        acc = torch.zeros(_FIELDS, dtype=torch.float64)
        edges = None if images is None else edge_density(images[:len(labels)]).double().cpu().tolist()
        for b, lab in enumerate(labels):
            n = int(torch.unique(groups[b]).numel())
            acc[6:10] += torch.tensor([length, n, 1, n * n], dtype=torch.float64)
            if edges is not None:
                acc[_BASE:_BASE + 6] += _pair(n, edges[b])
            if lab is None:
                continue
            lab_t = torch.as_tensor(lab, dtype=torch.bool)
            acc[_BASE + 6:_BASE + 12] += _pair(n, label_changes(lab_t))
            seg, maj, _ = segment_purity_sums(groups[b], lab_t)
            seg_even, maj_even, _ = segment_purity_sums(
                segment_ids(regular_boundaries(length, n).unsqueeze(0))[0], lab_t)
            acc[0:6] += torch.tensor([seg, seg_even, n, maj, maj_even, length], dtype=torch.float64)
        hist = torch.zeros(HIST_BINS, dtype=torch.float64) if scores is None else \
            torch.histc(scores.detach().float().cpu().clamp(0, 1), bins=HIST_BINS, min=0.0, max=1.0).double()
        self.sums += torch.cat([acc, hist]).to(self.sums.device)

    def result(self, prefix: str = "") -> dict[str, float]:
        s = self.sums.cpu()
        seg, seg_even, labelled, maj, maj_even, labelled_patches, patches, segments, images, segments_sq = \
            s[:_BASE].tolist()
        if not segments:
            return {}
        hist = s[_FIELDS:]
        correlations = {}
        for i, name in enumerate(COMPLEXITY):
            r = correlation_from_sums(*s[_BASE + 6 * i:_BASE + 6 * (i + 1)].tolist())
            if not np.isnan(r.lo):  # (n >= 4 images, neither constant)
                correlations.update({f"{prefix}segments_{name}_r": r.mean, f"{prefix}segments_{name}_r_lo": r.lo,
                                     f"{prefix}segments_{name}_r_hi": r.hi})
        cdf = hist.cumsum(0) / max(float(hist.sum()), 1.0)
        q = [float((torch.searchsorted(cdf, torch.tensor([p], dtype=cdf.dtype)).clamp(max=HIST_BINS - 1) + 0.5)
                   / HIST_BINS) for p in (0.05, 0.95)]
        length = patches / images
        mean = segments / images
        # the rate whose expected segment count (dtp_ds.models.expected_segments) is the one seen
        rate = (mean - 1.0) / max(length - 1.0, 1.0)
        std = max(segments_sq / images - mean * mean, 0.0) ** 0.5
        out = {f"{prefix}compression": patches / segments, f"{prefix}boundary_rate": rate,
               f"{prefix}segments_mean": mean, f"{prefix}segments_std": std, f"{prefix}segments_cv": std / mean,
               **correlations}
        if hist.sum() > 0:  # the reducer reported per-patch scores
            out.update({f"{prefix}prob_spread": q[1] - q[0], f"{prefix}prob_q05": q[0], f"{prefix}prob_q95": q[1]})
        if labelled:
            out.update({f"{prefix}purity": seg / labelled, f"{prefix}purity_even": seg_even / labelled,
                        f"{prefix}purity_by_patch": maj / labelled_patches,
                        f"{prefix}purity_by_patch_even": maj_even / labelled_patches})
        return out
