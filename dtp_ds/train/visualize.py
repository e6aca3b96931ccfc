"""``tools/visualize_boundaries``: draw a checkpoint's learned segment boundaries on images, one
PNG per image (the drawing is :mod:`dtp_ds.eval.boundaries`; reading a run's checkpoint is the
train layer's, hence the command lives here)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np

from dtp_ds.eval.boundaries import _segments, grouping_trunk, list_images, target_compression, visualize
from dtp_ds.train.export import load_model_from_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="visualize_boundaries",
        description="Draw the groups (DRIP: segment boundaries) a checkpoint's token reducer makes on images, as "
                    "evaluation makes them (DRIP: the predictor's eval rule, the one zero-shot evaluation and "
                    "tools/flops use).")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory LOGS/NAME (newest complete checkpoint), its checkpoints/ directory, "
                             "or one checkpoint directory checkpoints/step_N; any ZeRO stage")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="IMG", help="image files")
    src.add_argument("--image-dir", metavar="DIR", help="a directory of images (searched recursively, sorted)")
    parser.add_argument("--max-images", type=int, default=None, metavar="N",
                        help="at most N images (default: all of --images, 16 of --image-dir)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go (created)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


class _NoPretrainedNote(logging.Filter):
    """open_clip warns that it loaded no pretrained weights; the checkpoint's come next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


_NO_PRETRAINED_NOTE = _NoPretrainedNote()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().addFilter(_NO_PRETRAINED_NOTE)  # open_clip logs on the root logger
    args = parse_args(argv)
    try:
        if args.images:
            missing = [p for p in args.images if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"--images: no such file: {', '.join(missing)}")
            paths, root = args.images[: args.max_images], None
        else:
            paths, root = list_images(args.image_dir, args.max_images or 16), args.image_dir
        model, name = load_model_from_checkpoint(args.checkpoint, args.device)
        grouping_trunk(model, name)  # refuse models without a reducer before any output
        written = visualize(model, name, paths, args.out, root, args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"visualize_boundaries: error: {e}", file=sys.stderr)
        return 2
    for w in written:
        b = w.boundaries
        print(f"{w.png}: {_segments(b)} / {b.num_patches} patches, compression {b.compression:.2f}x")
    per_image = [w.boundaries.compression for w in written]
    overall = sum(w.boundaries.num_patches for w in written) / sum(w.boundaries.num_segments for w in written)
    target = target_compression(grouping_trunk(model))
    print(f"{len(written)} images, model {name}{target}: mean compression {np.mean(per_image):.2f}x "
          f"(min {min(per_image):.2f}, max {max(per_image):.2f}; all patches / all segments "
          f"{overall:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
