"""Synthetic shards: img2dataset layout, decodable images, truthful captions, determinism,
the ImageFolder zero-shot split and the CLI. Real files in tmp_path, no mocks."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtp_ds.data import synthetic as syn

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, PER_SHARD, PER_CLASS, SIZE, SEED = 60, 25, 2, 64, 123


def _words(text: str, vocab: object) -> set[str]:
    return {w for w in vocab if re.search(rf"\b{re.escape(w)}\b", text.lower())}


def _has_color(img: Image.Image, color: str, min_pixels: int = 15) -> bool:
    """The drawn shape's colour really is in the image (JPEG-tolerant distance)."""
    arr = np.asarray(img.convert("RGB"), dtype=float)
    dist = np.linalg.norm(arr - np.asarray(syn.COLORS[color], float), axis=-1)
    return int((dist < 60).sum()) >= min_pixels


def _read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.items())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    summary = syn.write_synthetic_dataset(out, N_TRAIN, PER_SHARD, PER_CLASS, SIZE, SEED)
    return out, summary


def test_layout_matches_img2dataset(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    train = out / "train"
    n_shards = 3  # 25 + 25 + 10: the last shard is partial
    expected = sorted([f"{s:05d}.tar" for s in range(n_shards)]
                      + [f"{s:05d}_stats.json" for s in range(n_shards)])
    assert sorted(p.name for p in train.iterdir()) == expected  # no temp files left behind
    assert summary["num_shards"] == n_shards and summary["num_train"] == N_TRAIN
    assert summary["shards"] == [str(train / f"{s:05d}.tar") for s in range(n_shards)]
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk["num_train"] == N_TRAIN and on_disk["shards"][0] == "train/00000.tar"
    keys = []
    for s in range(n_shards):
        with tarfile.open(train / f"{s:05d}.tar") as tar:
            names = tar.getnames()
        # img2dataset order: KEY.jpg, KEY.txt, KEY.json per sample, members grouped by key.
        assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", n) for n in names)
        samples = _read_shard(train / f"{s:05d}.tar")
        assert len(names) == 3 * len(samples)
        for key, files in samples:
            assert set(files) == {"jpg", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert meta["caption"] == files["txt"].decode("utf-8")
            keys.append(key)
        stats = json.loads((train / f"{s:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(samples)
    assert keys == [f"{i:09d}" for i in range(N_TRAIN)]


def test_images_decode_and_captions_tell_the_truth(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    size_words = {"small": {"small", "little"}, "medium": {"medium", "medium-sized"},
                  "large": {"large", "big"}}
    captions, pairs = set(), 0
    for shard in sorted((out / "train").glob("*.tar")):
        for _, files in _read_shard(shard):
            meta, text = json.loads(files["json"]), files["txt"].decode("utf-8")
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (SIZE, SIZE) == (meta["width"], meta["height"])
            if meta["kind"] == "pair":  # a layout scene: both shapes, and which is left, named
                pairs += 1
                assert _has_color(img, meta["left_color"]) and _has_color(img, meta["right_color"])
                assert _words(text, syn.COLORS) <= {meta["left_color"], meta["right_color"]}, text
                assert _words(text, syn.SHAPES) == {meta["left_shape"], meta["right_shape"]}, text
                left, right = meta["left_shape"], meta["right_shape"]
                said = (re.search(rf"{left}\b.*\b(left of|on the left and)\b.*\b{right}", text)
                        or re.search(rf"{right}\b.*\bright of\b.*\b{left}", text)
                        or re.search(rf"on the left .*{left}, on the right .*{right}", text))
                assert said, text
                assert syn.layout_classnames()[meta["class_index"]] == meta["classname"]
                assert [o["cx"] < SIZE / 2 for o in meta["objects"]] == [True, False]
                captions.add(text)
                continue
            assert _has_color(img, meta["color"])
            # Exactly the recorded colour and shape are named (distractors are not mentioned).
            assert _words(text, syn.COLORS) == {meta["color"]}, text
            assert _words(text, syn.SHAPES) == {meta["shape"]}, text
            named_sizes = {k for k, ws in size_words.items() if _words(text, ws)}
            assert named_sizes <= {meta["size"]}, text
            assert _words(text, syn.BACKGROUNDS) <= {meta["background"]}, text
            assert meta["size"] in syn.SIZES and meta["position"] in syn.POSITIONS
            assert syn.classnames()[meta["class_index"]] == meta["classname"]
            captions.add(text)
    assert len(captions) > N_TRAIN * 0.8  # wording varies
    assert 0.05 * N_TRAIN < pairs < 0.4 * N_TRAIN  # PAIR_PROB = 0.2


def test_same_seed_gives_identical_bytes(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    again = tmp_path / "again"
    syn.write_synthetic_dataset(again, N_TRAIN, PER_SHARD, PER_CLASS, SIZE, SEED)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    syn.write_synthetic_dataset(other, 5, PER_SHARD, 0, SIZE, SEED + 1)
    assert (other / "train/00000.tar").read_bytes()[:4096] != \
        (out / "train/00000.tar").read_bytes()[:4096]


def test_zeroshot_split_is_an_imagefolder(dataset: tuple[Path, dict]) -> None:
    from torchvision.datasets import ImageFolder

    out, summary = dataset
    zs = out / "zeroshot"
    names = json.loads((zs / "classnames.json").read_text())
    templates = json.loads((zs / "templates.json").read_text())
    assert names == syn.classnames() and len(names) == 48 == summary["num_classes"]
    assert len(set(names)) == len(names)
    assert templates and all("{}" in t for t in templates)
    ds = ImageFolder(str(zs))
    assert ds.classes == [f"c{i:03d}" for i in range(len(names))]
    assert len(ds) == PER_CLASS * len(names) == summary["num_zeroshot"]
    assert sorted(ds.targets) == [i for i in range(len(names)) for _ in range(PER_CLASS)]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.size == (SIZE, SIZE)
        assert _has_color(img, names[label].split()[0]), (ds.samples[i][0], names[label])


def test_layout_split_classes_are_which_shape_is_left(dataset: tuple[Path, dict]) -> None:
    from torchvision.datasets import ImageFolder

    out, summary = dataset
    split = out / "layout"
    names = json.loads((split / "classnames.json").read_text())
    assert names == syn.layout_classnames() and len(names) == 30 == summary["num_layout_classes"]
    objects = syn.read_objects(split)
    ds = ImageFolder(str(split))
    assert len(ds) == PER_CLASS * 30 == len(objects["objects"])
    for path, label in ds.samples:
        left, right = names[label].split(" left of a ")
        objs = objects["objects"][Path(path).relative_to(split).as_posix()]
        assert [o["shape"] for o in objs] == [left, right] and objs[0]["cx"] < objs[1]["cx"]
    # the shapes split records its objects too: one per image, the class's shape
    zs = syn.read_objects(out / "zeroshot")
    assert all(len(v) == 1 and v[0]["shape"] == syn.classnames()[int(k[1:4])].split()[1]
               for k, v in zs["objects"].items())


def test_webdataset_reads_the_shards(dataset: tuple[Path, dict]) -> None:
    import webdataset as wds

    _, summary = dataset
    ds = wds.WebDataset(summary["shards"], shardshuffle=False).decode("pil").to_tuple("jpg", "txt")
    rows = list(ds)
    assert len(rows) == N_TRAIN
    img, text = rows[0]
    assert isinstance(img, Image.Image) and img.size == (SIZE, SIZE)
    assert isinstance(text, str) and text
    # The brace pattern the trainer's --train-data takes names the same shards.
    assert len(list(wds.WebDataset(summary["train_pattern"], shardshuffle=False))) == N_TRAIN


def test_cli_refuses_nonempty_out_and_overwrites_stale_shards(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--num-samples", "9", "--samples-per-shard", "3",
            "--val-per-class", "1"]
    assert syn.main(args) == 0
    assert len(list((out / "train").glob("*.tar"))) == 3
    before = (out / "train/00000.tar").read_bytes()
    capsys.readouterr()
    assert syn.main(args) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "train/00000.tar").read_bytes() == before  # refused: nothing touched
    with pytest.raises(FileExistsError):
        syn.write_synthetic_dataset(out, 3, 3, 1, SIZE, 0, overwrite=False)
    # Overwrite with fewer shards: the stale ones must go, or a *.tar glob would mix runs.
    assert syn.main([*args[:2], "--num-samples", "3", "--samples-per-shard", "3",
                     "--val-per-class", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["00000.tar", "00000_stats.json"]


def test_tool_script_runs(tmp_path: Path) -> None:
    out = tmp_path / "tool"
    cmd = [sys.executable, str(REPO / "tools/make_synthetic_shards"), "--out", str(out),
           "--num-samples", "4", "--samples-per-shard", "2", "--val-per-class", "1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote 4 train samples" in res.stdout
    assert (out / "train/00001.tar").is_file() and (out / "zeroshot/c047/00000.jpg").is_file()
    # the class-labelled split (--task classify), sized by --num-samples / --val-per-class
    assert "wrote 4 class-labelled train samples (56 classes" in res.stdout
    with tarfile.open(out / "classify/train/00001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000002.jpg", "000000002.cls"] and 0 <= int(tar.extractfile(names[1]).read()) < 56
    assert (out / "classify/val/c055/00000.jpg").read_bytes() in _shard_bytes(out / "classify/val_shards/00000.tar")


def _shard_bytes(path: Path) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
