"""tools/prepare_imagenet and ImageNet's flat val with its devkit, on a fabricated release: a
validation tar of flat ILSVRC2012_val_*.JPEG files and a devkit whose meta.mat / ground truth
follow the real ones' layout (ILSVRC2012_IDs deliberately not in wnid order)."""
from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dtp_ds.data.imagenet import ImageNetError, check_class_order, main, prepare, read_devkit
from dtp_ds.data.shards import DataError
from dtp_ds.eval.zeroshot import check_split, imagenet_split, split_samples

ROOT = Path(__file__).resolve().parents[2]
# ImageNet's first four classes (sorted wnid order: indices 0..3), given ILSVRC2012_IDs in another order
LEAVES = {1: "n01491361", 2: "n01440764", 3: "n01484850", 4: "n01443537"}
COLOURS = {"n01440764": (200, 30, 30), "n01443537": (30, 200, 30), "n01484850": (30, 30, 200),
           "n01491361": (200, 200, 30)}
GROUND_TRUTH = [3, 1, 2, 4, 2, 1, 4, 3, 1]  # image i+1's ILSVRC2012_ID


def _meta_mat() -> bytes:
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, f"class {w}", "", 0, np.zeros((0,)), 0, 1300) for i, w in LEAVES.items()]
    rows.append((5, "n00001740", "entity", "", 4, np.array(list(LEAVES)), 19, 0))  # a synset above the classes
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[k, 0][f] = v
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def release(tmp_path: Path) -> dict[str, Path]:
    """ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz and both extracted."""
    devkit_files = {"ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(),
                    "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                        "".join(f"{i}\n" for i in GROUND_TRUTH).encode(),
                    "ILSVRC2012_devkit_t12/readme.txt": b"fabricated"}
    devkit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit, "w:gz") as tar:
        for name, data in devkit_files.items():
            _add(tar, name, data)
    flat = tmp_path / "flat"
    flat.mkdir()
    val = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(val, "w") as tar:
        for n, gt in enumerate(GROUND_TRUTH, 1):
            data = _jpeg(COLOURS[LEAVES[gt]])
            _add(tar, f"ILSVRC2012_val_{n:08d}.JPEG", data)
            (flat / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(data)
    extracted = tmp_path / "devkit_dir"
    with tarfile.open(devkit) as tar:
        tar.extractall(extracted, filter="data")
    return {"val": val, "devkit": devkit, "flat": flat, "devkit_dir": extracted}


def _colour(path: Path) -> tuple[int, int, int]:
    with Image.open(path) as im:
        return tuple(int(round(c)) for c in np.asarray(im.convert("RGB")).reshape(-1, 3).mean(0))


def test_the_devkit_maps_leaf_ids_to_wnids_and_each_val_image_to_its_class(release):
    kit = read_devkit(str(release["devkit"]))
    assert kit.id_to_wnid == LEAVES  # the synset above the classes is not one
    assert kit.wnids == sorted(LEAVES.values())
    assert [kit.wnid_of(n) for n in (1, 2, 9)] == [LEAVES[3], LEAVES[1], LEAVES[1]]
    assert read_devkit(str(release["devkit_dir"])) == kit  # extracted: the same


def test_prepare_sorts_the_val_tar_into_wnid_folders_by_the_ground_truth(release, tmp_path):
    out = tmp_path / "val"
    counts = prepare(str(release["val"]), str(release["devkit"]), str(out))
    assert sum(counts.values()) == len(GROUND_TRUTH)
    assert sorted(os.listdir(out)) == sorted(LEAVES.values())
    for n, gt in enumerate(GROUND_TRUTH, 1):
        path = out / LEAVES[gt] / f"ILSVRC2012_val_{n:08d}.JPEG"
        assert path.read_bytes() == (release["flat"] / path.name).read_bytes()
        assert max(abs(a - b) for a, b in zip(_colour(path), COLOURS[LEAVES[gt]])) <= 3
    # torchvision's convention: class index = sorted wnid order
    from torchvision.datasets import ImageFolder

    assert ImageFolder(str(out)).class_to_idx == {w: i for i, w in enumerate(sorted(LEAVES.values()))}
    assert not list(out.rglob("*.part"))
    # a rerun (an interrupted one finishing) keeps what is in place and adds nothing twice
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")}
    assert prepare(str(release["val"]), str(release["devkit"]), str(out)) == counts
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")} == before


def test_prepare_from_flat_files_and_an_extracted_devkit(release, tmp_path):
    out = tmp_path / "val2"
    prepare(str(release["flat"]), str(release["devkit_dir"]), str(out))
    assert sorted(p.name for p in out.rglob("*.JPEG")) == sorted(os.listdir(release["flat"]))
    assert sorted(os.listdir(release["flat"])) == sorted(p.name for p in release["flat"].iterdir())  # kept


def test_the_tool_reports_and_fails_naming_the_fix(release, tmp_path, capsys):
    out = tmp_path / "val3"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "prepare_imagenet"), "--val", str(release["val"]),
                        "--devkit", str(release["devkit"]), "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(GROUND_TRUTH)} images in 4 wnid folders" in r.stdout and "--imagenet-val" in r.stdout
    assert main(["--val", str(release["val"]), "--devkit", str(release["val"]), "--out", str(out)]) == 2
    assert "ILSVRC2012_devkit_t12.tar.gz" in capsys.readouterr().err


def test_a_ground_truth_from_another_devkit_is_refused(release, tmp_path):
    gt = release["devkit_dir"] / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n7\n")
    with pytest.raises(ImageNetError, match=r"\[7\] are not leaf synsets"):
        read_devkit(str(release["devkit_dir"]))


def test_flat_val_with_the_devkit_beside_it_is_the_same_split_as_its_wnid_folders(release, tmp_path):
    out = tmp_path / "val"
    prepare(str(release["val"]), str(release["devkit"]), str(out))
    folders = imagenet_split(str(out))
    flat = imagenet_split(str(release["flat"]))  # the devkit tar sits in the parent directory
    assert folders.samples is None and flat.samples is not None
    check_split(dataclasses.replace(flat, classnames=flat.classnames))
    want = [(os.path.basename(p), label) for p, label in split_samples(folders)]
    assert [(os.path.basename(p), label) for p, label in split_samples(flat)] == want
    assert len(want) == len(GROUND_TRUTH) and {label for _, label in want} == {0, 1, 2, 3}


def test_flat_val_without_a_devkit_names_prepare_imagenet(release, tmp_path):
    lone = tmp_path / "lone" / "val"
    lone.mkdir(parents=True)
    (lone / "ILSVRC2012_val_00000001.JPEG").write_bytes((release["flat"] / "ILSVRC2012_val_00000001.JPEG")
                                                        .read_bytes())
    with pytest.raises(DataError, match="tools/prepare_imagenet"):
        imagenet_split(str(lone))


def test_sorted_wnid_order_is_open_clips_class_name_order():
    """open_clip's IMAGENET_CLASSNAMES are indexed by sorted wnid (torchvision's ImageFolder
    order): by timm's wnid list and WordNet lemmas, 80% of the names are a lemma of the wnid at
    their index, and almost none of the wnid one place further."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = info.label_names()
    assert len(wnids) == len(IMAGENET_CLASSNAMES) == 1000 and wnids == sorted(wnids)
    check_class_order(sorted(wnids))

    def lemma_hits(shift: int) -> int:
        return sum(name.lower() in [w.strip().lower() for w in
                                    re.split(",", info.label_name_to_description(wnids[(i + shift) % 1000]))]
                   for i, name in enumerate(IMAGENET_CLASSNAMES))

    assert lemma_hits(0) >= 750 and lemma_hits(1) <= 20
    with pytest.raises(ImageNetError, match="not ImageNet-1k's"):
        check_class_order(sorted(wnids[:-1] + ["n99999999"]))


def test_zero_shot_scores_flat_and_folder_layouts_alike_and_counts_an_undecodable_image(release, tmp_path):
    import open_clip
    import torch

    import dtp_ds  # noqa: F401  (registers ViT-Tiny-8)
    from dtp_ds.eval.boundaries import val_transform
    from dtp_ds.eval.zeroshot import zero_shot_eval

    out = tmp_path / "val"
    prepare(str(release["val"]), str(release["devkit"]), str(out))
    (release["flat"] / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (out / LEAVES[1] / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-Tiny-8")
    tok = open_clip.get_tokenizer("ViT-Tiny-8")
    results = []
    for image_dir in (out, release["flat"]):
        split = imagenet_split(str(image_dir))
        split = dataclasses.replace(split, classnames=split.classnames[:4], templates=split.templates[:1])
        results.append(zero_shot_eval(model, tok, val_transform(model), split, torch.device("cpu"), batch_size=4,
                                      workers=0))
    assert results[0] == results[1]
    assert results[0]["zeroshot_images"] == len(GROUND_TRUTH) - 1 and results[0]["zeroshot_unusable"] == 1
