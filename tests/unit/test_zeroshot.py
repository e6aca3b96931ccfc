"""Zero-shot evaluation decodes its images in loader workers, with the same result as in-process."""
from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch

import dtp_ds  # noqa: F401  (registers the dtp_ds model names with open_clip)
from dtp_ds.data.synthetic import write_synthetic_dataset
from dtp_ds.eval.boundaries import val_transform
from dtp_ds.eval.zeroshot import folder_split, zero_shot_eval

NAME = "DRIP-ViT-Tiny-8-4x"  # boundary purity reads each image's objects: the order must hold too


class PidLogging:
    """The validation transform, noting which process ran it."""

    def __init__(self, transform, log: Path):
        self.transform, self.log = transform, log

    def __call__(self, image):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.transform(image)


def test_workers_decode_the_same_images_in_the_same_order(tmp_path):
    write_synthetic_dataset(tmp_path, num_train=2, samples_per_shard=2, val_per_class=2, image_size=64, seed=0)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, output_dict=True)
    split = folder_split(str(tmp_path / "zeroshot"))
    features: list[torch.Tensor] = []
    model.visual.register_forward_hook(lambda m, args, out: features.append(out.detach().clone()))
    runs = []
    for workers in (0, 2):
        features.clear()
        pids = tmp_path / f"pids{workers}"
        res = zero_shot_eval(model, open_clip.get_tokenizer(NAME), PidLogging(val_transform(model), pids), split,
                             torch.device("cpu"), batch_size=16, max_images=40, workers=workers)
        runs.append((res, list(features)))
        decoders = set(pids.read_text().split())
        assert len(decoders) == (1 if workers == 0 else 2) and (str(os.getpid()) in decoders) == (workers == 0)
    (res0, feats0), (res2, feats2) = runs
    assert res0 == res2 and res0["zeroshot_images"] == 40 and "zeroshot_purity" in res0
    assert len(feats0) == 3 and all(torch.equal(a, b) for a, b in zip(feats0, feats2, strict=True))
