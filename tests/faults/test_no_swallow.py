"""No failure swallowed: only the data's own read and decode errors count as bad data
(:mod:`dtp_ds.data.decode` decides); a bug in the project's own code (augmentation,
tokenisation) stops the loader, the evaluation and a real training run with its traceback.

The bug is injected into one sample in the middle of the stream (the 3rd or 5th a worker sees):
were it swallowed, it would pass for one more corrupt JPEG under the 5% bad-data limit and
the run would go on."""
from __future__ import annotations

import io
import itertools
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dtp_ds.data import shards as sh
from dtp_ds.data.decode import BadSample, decode_field, decode_image, decode_sample
from dtp_ds.data.folder import class_folder, make_folder_loader
from dtp_ds.data.shards import DataConfig, DataError, make_train_loader, plan_epoch
from dtp_ds.eval.classify import ClassSplit, classify_eval
from tests.conftest import REPO, base_args, deepspeed_cmd, leaked_shm
from tests.faults import corrupt
from tests.faults.conftest import FAST_ENV, steps

BUG = "injected augmentation bug"


def augment_with_a_bug(image) -> float:
    return image.width / 0  # ZeroDivisionError: the project's own code, not the data


class FlakyAugment:
    """A data stage (``keys``, ``(image, sample) -> tensors``) whose augmentation has a bug that
    strikes on the ``fail_at``-th sample this process gives it."""

    def __init__(self, keys: tuple[str, ...], fail_at: int) -> None:
        self.keys, self.fail_at, self.calls = keys, fail_at, 0

    def __call__(self, image, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at:
            augment_with_a_bug(image)
        return torch.zeros(3, 4, 4), torch.zeros(1)


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "JPEG")
    return buf.getvalue()


def _cls_shard(path: Path, images: list[bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for i, data in enumerate(images):
            for name, payload in ((f"{i:09d}.jpg", data), (f"{i:09d}.cls", str(i % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    return path


def test_a_bug_in_the_augmentation_stops_the_shard_loader_with_its_traceback(synth):
    shards = sorted(str(p) for p in (synth / "train").glob("*.tar"))[:1]
    plan = plan_epoch(32, 8, 1, 1, 1)
    loader = make_train_loader(DataConfig(workers=1), shards, plan, FlakyAugment(("txt",), 5), 8, epoch=0, seed=0,
                               rank=0, world_size=1)
    with pytest.raises(ZeroDivisionError) as err:
        list(loader)
    # the worker's own traceback comes along, down to the line of the bug
    assert "Original Traceback" in str(err.value) and "augment_with_a_bug" in str(err.value), str(err.value)


def test_a_bug_in_the_augmentation_stops_the_folder_loader_with_its_traceback(synth):
    folder = class_folder(str(synth / "zeroshot"))
    plan = plan_epoch(32, 8, 1, 1, 1)
    loader = make_folder_loader(DataConfig(workers=1), folder, plan, FlakyAugment(("cls",), 3), 8, 0, 0, 0, 1)
    with pytest.raises(ZeroDivisionError) as err:
        list(loader)
    assert "augment_with_a_bug" in str(err.value), str(err.value)


def test_corrupt_images_and_captions_are_still_counted_and_replaced(synth, tmp_path):
    """The narrowed decode still counts what is really bad data: corrupt JPEGs and a caption
    that is not utf-8 (which the task's tokeniser would otherwise meet), and nothing else."""
    (shard,) = corrupt.copy_shards(synth / "train", tmp_path, 1)
    keys = corrupt.corrupt_jpegs(shard, 2)
    members = corrupt._members(shard)
    txt = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".txt") and m.name[:-4] not in keys)
    members[txt] = (members[txt][0], b"\xff\xfe not utf-8")
    corrupt._write(shard, members)

    def caption_stage(image, sample):  # what CaptionStage does with the caption
        return torch.zeros(1), torch.tensor([len(sample["txt"].decode("utf-8"))])

    caption_stage.keys = ("txt",)
    items = list(sh._DecodeCounted(caption_stage, 0, 0).run(sh._ReadShards().run(iter([{"url": str(shard)}]))))
    bad = [b for b in items if isinstance(b, sh.Bad)]
    assert len(items) - len(bad) == 200 - 3
    assert sorted(b.kind for b in bad) == ["decode_error"] * 3
    assert sum("UnicodeDecodeError" in b.reason for b in bad) == 1, [b.reason for b in bad]
    assert sum(any(k in b.reason for k in keys) for b in bad) == 2, [b.reason for b in bad]


@pytest.mark.parametrize("case", ["not an image", "truncated", "bomb", "cls not an integer", "no image"])
def test_the_one_place_that_decides_what_is_bad_data(case, monkeypatch):
    jpeg = _jpeg()
    image, fields = decode_sample({"jpg": jpeg, "cls": b"7\n"}, ("cls",))
    assert image.mode == "RGB" and fields == {"cls": 7}
    with pytest.raises(BadSample):
        if case == "not an image":
            decode_image(b"\xff\xd8\xff\xe0 not a jpeg")
        elif case == "truncated":
            decode_image(jpeg[: len(jpeg) // 2])
        elif case == "bomb":
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 > 2 x 100: an error, not a warning
            decode_image(jpeg)
        elif case == "cls not an integer":
            decode_field({"cls": b"seven"}, "cls")
        else:
            decode_sample({"txt": b"a caption"})


class _Classifier(nn.Module):
    img_size, num_classes = (32, 32), 3

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def test_an_evaluation_with_no_usable_sample_raises_naming_the_split(tmp_path):
    split_dir = tmp_path / "val_shards"
    split_dir.mkdir()
    shard = _cls_shard(split_dir / "00000.tar", [b"\xff\xd8\xff\xe0 not a jpeg" + os.urandom(32)] * 6)
    split = ClassSplit("val_shards", shards=[str(shard)])
    with pytest.raises(DataError, match=r"val_shards .*no usable sample.*6 samples read.*first failure: .*00000\.tar: "
                                        r"sample 000000000: (OSError|UnidentifiedImageError)") as e:
        classify_eval(_Classifier(), _to_tensor, split, torch.device("cpu"), batch_size=4, workers=0)
    assert str(split_dir) in str(e.value)
    # (before: top-1 0% of max(0, 1) images, no cause given)


def test_a_bug_in_the_evaluation_transform_is_not_an_unusable_sample(tmp_path):
    shard = _cls_shard(tmp_path / "00000.tar", [_jpeg()] * 6)
    calls = itertools.count(1)

    def transform(image):
        if next(calls) == 3:
            augment_with_a_bug(image)
        return _to_tensor(image)

    split = ClassSplit("val", shards=[str(shard)])
    with pytest.raises(ZeroDivisionError):
        classify_eval(_Classifier(), transform, split, torch.device("cpu"), batch_size=4, workers=0)


RANK_SCRIPT = """
import itertools, sys

from dtp_ds.tasks.clip import CaptionStage

real, calls = CaptionStage.__call__, itertools.count(1)


def augment_with_a_bug(image):
    return image.width / 0


def flaky(self, image, sample):  # the 5th sample a loader worker augments meets the bug
    if next(calls) == 5:
        augment_with_a_bug(image)
    return real(self, image, sample)


CaptionStage.__call__ = flaky
from dtp_ds.train.main import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.dist
def test_a_training_run_with_an_augmentation_bug_stops_with_its_traceback(synth, tmp_path):
    """A real run (1 rank under the deepspeed launcher, its loader worker a separate process)
    whose augmentation fails on one sample of the first batch: it stops, non-zero, with the
    bug's traceback, instead of counting one more decode error and training on."""
    script = tmp_path / "rank_with_bug.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    args = base_args(synth, tmp_path / "logs", "bug", "--max-steps", "2", "--precision", "fp32", "--zero-stage",
                     "0")
    cmd = deepspeed_cmd(1)
    port = int(cmd[cmd.index("--master_port") + 1])
    cmd = cmd[:cmd.index("--module")] + [str(script)] + args
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        leaked_shm(port)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "augment_with_a_bug" in proc.stderr, proc.stderr[-3000:]
    assert "ZeroDivisionError" in proc.stderr and "bad data" not in proc.stderr, proc.stderr[-3000:]
    run_dir = tmp_path / "logs" / "bug"
    assert not (run_dir / "metrics.jsonl").exists() or not steps(run_dir)  # not one step trained
