"""ImageNet-1k validation: the devkit's labels, and ``tools/prepare_imagenet``, which sorts the
50,000 flat validation images into the 1000 wnid folders every evaluation reads.

The release ships the validation images flat (``ILSVRC2012_img_val.tar``:
``ILSVRC2012_val_00000001.JPEG`` ...) and their labels in the devkit
(``ILSVRC2012_devkit_t12.tar.gz``): ``data/ILSVRC2012_validation_ground_truth.txt`` holds image
i's ``ILSVRC2012_ID`` on line i, and ``data/meta.mat``'s ``synsets`` map an ILSVRC2012_ID to its
WordNet id (the 1000 leaf synsets, ``num_children == 0``, are the classes; the others are the
hierarchy above them).

Class index = sorted wnid order: torchvision's ``ImageFolder`` (and so its ``ImageNet``) numbers
the wnid folders that way, and open_clip's ``IMAGENET_CLASSNAMES`` follow it (index 0 is
n01440764, "tench"; tests/unit/test_prepare_imagenet.py checks the alignment against timm's wnid
list). The devkit's own ILSVRC2012_IDs are in a different order and are never used as indices.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG", re.IGNORECASE)
NUM_CLASSES, NUM_VAL = 1000, 50000


class ImageNetError(ValueError):
    """The ImageNet files cannot be used as given; the message names the fix."""


@dataclass
class Devkit:
    """What the devkit says about the validation set."""

    id_to_wnid: dict[int, str]  # ILSVRC2012_ID -> wnid, the leaf synsets (the classes) only
    val_ids: list[int]  # the ILSVRC2012_ID of validation image i + 1 (its ground truth line)

    @property
    def wnids(self) -> list[str]:
        """The classes in index order (sorted wnids)."""
        return sorted(self.id_to_wnid.values())

    def wnid_of(self, number: int) -> str:
        """The wnid of validation image ``number`` (1-based, as in its file name)."""
        if not 1 <= number <= len(self.val_ids):
            raise ImageNetError(f"validation image {number}: the devkit's ground truth has {len(self.val_ids)} lines")
        return self.id_to_wnid[self.val_ids[number - 1]]


def parse_meta(f: IO[bytes]) -> dict[int, str]:
    """``meta.mat`` -> {ILSVRC2012_ID: wnid} of the leaf synsets (fields read by name, not position)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(f, squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except (KeyError, ValueError, TypeError) as e:
        raise ImageNetError(f"{META}: not the devkit's synsets table ({type(e).__name__}: {e})") from e
    return {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}


def parse_ground_truth(f: IO[bytes], id_to_wnid: dict[int, str]) -> list[int]:
    """The ground truth file -> one ILSVRC2012_ID per validation image, each checked to be a class."""
    ids = [int(line) for line in f.read().decode().split()]
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise ImageNetError(f"{GROUND_TRUTH}: ILSVRC2012_IDs {unknown[:5]} are not leaf synsets of {META}; "
                            f"the two files come from different devkits")
    return ids


def read_devkit(path: str) -> Devkit:
    """The devkit as released (``ILSVRC2012_devkit_t12.tar.gz``) or extracted (the directory
    holding ``data/``, or its parent)."""
    if os.path.isdir(path):
        base = next((b for b in (path, os.path.join(path, "ILSVRC2012_devkit_t12"))
                     if os.path.isfile(os.path.join(b, META))), None)
        if base is None:
            raise ImageNetError(f"devkit {path}: no {META} under it; give ILSVRC2012_devkit_t12.tar.gz or the "
                                f"directory it extracts to")
        with open(os.path.join(base, META), "rb") as m, open(os.path.join(base, GROUND_TRUTH), "rb") as g:
            id_to_wnid = parse_meta(m)
            return Devkit(id_to_wnid, parse_ground_truth(g, id_to_wnid))
    try:
        with tarfile.open(path) as tar:
            found = {want: next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(want)), None)
                     for want in (META, GROUND_TRUTH)}
            missing = [w for w, m in found.items() if m is None]
            if missing:
                raise ImageNetError(f"devkit {path}: no {' or '.join(missing)} in it; give "
                                    f"ILSVRC2012_devkit_t12.tar.gz (the task 1 & 2 devkit)")
            id_to_wnid = parse_meta(io.BytesIO(tar.extractfile(found[META]).read()))
            return Devkit(id_to_wnid, parse_ground_truth(tar.extractfile(found[GROUND_TRUTH]), id_to_wnid))
    except (OSError, tarfile.TarError) as e:
        raise ImageNetError(f"devkit {path}: cannot be read ({type(e).__name__}: {e}); give "
                            f"ILSVRC2012_devkit_t12.tar.gz or the directory it extracts to") from e


def find_devkit(image_dir: str) -> str | None:
    """The devkit beside flat validation images (in their directory or its parent), if any."""
    for base in (image_dir, os.path.dirname(os.path.abspath(image_dir))):
        for name in ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12"):
            if os.path.exists(os.path.join(base, name)):
                return os.path.join(base, name)
    return None


def flat_images(image_dir: str) -> list[tuple[int, str]]:
    """(image number, path) of the flat ``ILSVRC2012_val_NNNNNNNN.JPEG`` files in ``image_dir``."""
    found = []
    for entry in os.scandir(image_dir):
        m = VAL_NAME.fullmatch(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry.path))
    return sorted(found)


def labelled_flat_images(image_dir: str, devkit: Devkit) -> list[tuple[str, int]]:
    """(path, class index) of flat validation images, in the order ``ImageFolder`` lists the
    same images sorted into wnid folders (class, then file name): either layout evaluates alike."""
    index = {w: i for i, w in enumerate(devkit.wnids)}
    labelled = [(path, index[devkit.wnid_of(n)]) for n, path in flat_images(image_dir)]
    return sorted(labelled, key=lambda s: (s[1], os.path.basename(s[0])))


def _val_members(source: str) -> Iterator[tuple[str, IO[bytes] | str]]:
    """(file name, data stream or path) of each validation image in the tar or flat directory."""
    if os.path.isdir(source):
        for _, path in flat_images(source):
            yield os.path.basename(path), path
        return
    with tarfile.open(source, mode="r|*") as tar:  # streamed: the 6.4 GB tar is read once, in order
        for member in tar:
            if member.isfile() and VAL_NAME.fullmatch(os.path.basename(member.name)):
                yield os.path.basename(member.name), tar.extractfile(member)


def _place(data: IO[bytes] | str, dest: str) -> None:
    """Write one image to ``dest`` through a temporary name (an interrupted run leaves no
    half-written image); from a flat directory a hard link where the file system allows."""
    tmp = dest + ".part"
    if isinstance(data, str):
        try:
            os.link(data, tmp)
        except OSError:
            shutil.copyfile(data, tmp)
    else:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(data, out)
    os.replace(tmp, dest)


def check_class_order(wnids: list[str]) -> None:
    """A devkit of the 1000 classes must name timm's ImageNet-1k wnids (the order open_clip's class
    names follow); a different set means another devkit or a damaged one."""
    if len(wnids) != NUM_CLASSES:
        return
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # (timm is a dependency; without it there is nothing to compare with)
        return
    known = sorted(ImageNetInfo().label_names())
    if wnids != known:
        odd = sorted(set(wnids) ^ set(known))[:5]
        raise ImageNetError(f"the devkit's 1000 classes are not ImageNet-1k's (differing wnids: {odd}); give "
                            f"ILSVRC2012_devkit_t12.tar.gz")


def prepare(val: str, devkit_path: str, out: str) -> Counter:
    """Sort the validation images (tar or flat directory ``val``) into ``out/WNID/`` by the
    devkit's ground truth; images already in place are kept (a rerun finishes an interrupted
    one). Returns the images per wnid; :class:`ImageNetError` when the files do not fit."""
    devkit = read_devkit(devkit_path)
    check_class_order(devkit.wnids)
    for wnid in devkit.wnids:
        os.makedirs(os.path.join(out, wnid), exist_ok=True)
    counts: Counter = Counter()
    for name, data in _val_members(val):
        number = int(VAL_NAME.fullmatch(name).group(1))
        wnid = devkit.wnid_of(number)
        dest = os.path.join(out, wnid, name)
        if not os.path.exists(dest):
            _place(data, dest)
        counts[wnid] += 1
    total = sum(counts.values())
    if total == 0:
        raise ImageNetError(f"{val}: no ILSVRC2012_val_NNNNNNNN.JPEG image in it; give ILSVRC2012_img_val.tar or "
                            f"the directory it extracts to")
    return counts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_imagenet",
        description="Sort ImageNet-1k's flat validation images into the 1000 wnid folders (class index = sorted "
                    "wnid order, open_clip's class-name order) that tools/evaluate --imagenet-val and "
                    "--imagenet-val in training read.")
    p.add_argument("--val", required=True, metavar="TAR|DIR",
                   help="ILSVRC2012_img_val.tar, or the directory of flat ILSVRC2012_val_*.JPEG files (hard-linked)")
    p.add_argument("--devkit", required=True, metavar="TAR.GZ|DIR",
                   help="ILSVRC2012_devkit_t12.tar.gz (meta.mat and the validation ground truth), or its directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where the wnid folders go (e.g. /data/imagenet/val)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        counts = prepare(a.val, a.devkit, a.out)
    except ImageNetError as e:
        print(f"prepare_imagenet: error: {e}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    print(f"prepare_imagenet: {total} images in {len(counts)} wnid folders under {a.out}")
    if total != NUM_VAL or len(counts) != NUM_CLASSES:
        print(f"prepare_imagenet: note: ImageNet-1k's validation set is {NUM_VAL} images of {NUM_CLASSES} classes; "
              f"this is a part of it", file=sys.stderr)
    print(f"evaluate with: tools/evaluate SOURCE --imagenet-val {a.out}")
    return 0
