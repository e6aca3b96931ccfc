"""Real damage to real img2dataset shards, as it happens on clusters: a corrupt JPEG, a
sample without caption, a tar cut off mid-write, a shard missing from the brace range, a
directory where a shard should be (we run as root: permission bits do not stop reads)."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path


def _members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]


def _write(shard: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    tmp = shard.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as t:
        for info, data in members:
            info = tarfile.TarInfo(info.name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    os.replace(tmp, shard)


def copy_shards(src: Path, dst: Path, n: int) -> list[Path]:
    """The first ``n`` shards (and their stats) of ``src`` copied to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        for name in (f"{i:05d}.tar", f"{i:05d}_stats.json"):
            shutil.copy(src / name, dst / name)
        out.append(dst / f"{i:05d}.tar")
    return out


def corrupt_jpegs(shard: Path, n: int) -> list[str]:
    """Replace the first ``n`` JPEGs with bytes that are not an image; returns their keys."""
    members, keys = _members(shard), []
    for i, (info, _) in enumerate(members):
        if info.name.endswith(".jpg") and len(keys) < n:
            members[i] = (info, b"\xff\xd8\xff\xe0 not a jpeg " + os.urandom(64))
            keys.append(info.name[:-4])
    _write(shard, members)
    return keys


def drop_captions(shard: Path, n: int) -> list[str]:
    """Remove the ``.txt`` of the first ``n`` samples; returns their keys."""
    members = _members(shard)
    keys = [m.name[:-4] for m, _ in members if m.name.endswith(".txt")][:n]
    _write(shard, [(m, d) for m, d in members if not (m.name.endswith(".txt") and m.name[:-4] in keys)])
    return keys


def truncate(shard: Path, keep_samples: int) -> None:
    """Cut the tar off in the middle of sample ``keep_samples``'s image data, as a killed
    writer or a short copy leaves it: the samples before it are whole."""
    with tarfile.open(shard) as t:
        jpgs = [m for m in t.getmembers() if m.name.endswith(".jpg")]
    cut = jpgs[keep_samples].offset_data + 100
    with open(shard, "r+b") as f:
        f.truncate(cut)


def replace_with_directory(shard: Path) -> None:
    """A directory where the shard should be: exists (so it is planned), cannot be read."""
    shard.unlink()
    shard.mkdir()
    (shard / "junk").write_text("not a tar")


def remove(shard: Path) -> None:
    """The shard is gone (its stats too: the brace range names it, nothing else does)."""
    shard.unlink()
    shard.with_name(shard.stem + "_stats.json").unlink(missing_ok=True)
