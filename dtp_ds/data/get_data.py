"""``tools/get_data``: img2dataset recipes for the sets the users train and evaluate on, writing
the WebDataset shards ``--train-data`` and ``tools/evaluate --retrieval`` read
(``OUT/00000.tar`` with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``, and ``OUT/00000_stats.json``,
whose ``successes`` is the shard's sample count)::

    tools/get_data cc3m  --url-list Train_GCC-training.tsv --out /data/cc3m
    tools/get_data cc12m --url-list cc12m.tsv --out /data/cc12m
    tools/get_data laion --url-list /data/relaion2B-en-research-safe/ --samples 3400000 --out /data/relaion-3.4m
    tools/get_data coco  --karpathy dataset_coco.json --split test --out /data/coco_test
    tools/get_data urls  --url-list my_list.parquet --out /data/mine

Each recipe turns its source into a url list img2dataset reads as it is (the headerless TSVs of
CC3M / CC12M get their column names, a LAION subset is drawn, COCO's Karpathy split becomes one
row per image), prints the equivalent ``img2dataset`` command, then runs img2dataset with the
options these sets need: webdataset output, resize (``keep_ratio`` to 256 on the short side by
default: training crops anyway, and ``border``, img2dataset's default, pads with white that
random crops would see), retries, the set's extra columns in ``KEY.json``, and
``incremental`` mode, so running the same command again resumes (shards whose stats exist are
kept). img2dataset is an optional extra (``pip install .[data]``), not a training dependency.

COCO: one sample per image; ``txt`` is its first caption (what training reads) and
``json``'s ``"captions"`` all five (what retrieval reads, :func:`dtp_ds.eval.retrieval.captions_of`).
The ``train`` split is Karpathy's train + restval (113,287 images), ``val`` and ``test`` 5,000 each.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

EXTRA = "pip install .[data]"
LAION_EXTRA_COLUMNS = ("similarity", "punsafe", "pwatermark", "aesthetic", "NSFW", "LICENSE", "WIDTH", "HEIGHT",
                       "width", "height")
COCO_IMAGES = "http://images.cocodataset.org"
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
RESIZE_MODES = ("keep_ratio", "border", "center_crop", "keep_ratio_largest", "no")


class GetDataError(ValueError):
    """The source cannot be used as given; the message names the fix."""


@dataclass
class UrlList:
    """What img2dataset reads: a file or directory, its format, and its columns."""

    path: str
    input_format: str
    url_col: str
    caption_col: str | None
    extra_columns: list[str] = field(default_factory=list)


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401  (img2dataset's own dependency)
        import pyarrow.parquet
    except ImportError as e:
        raise GetDataError(f"pyarrow is missing: it comes with img2dataset ({EXTRA})") from e
    return pyarrow


def _find(columns: list[str], wanted: tuple[str, ...], what: str, source: str) -> str:
    """The first of ``wanted`` among ``columns``, case-insensitively."""
    lower = {c.lower(): c for c in columns}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    raise GetDataError(f"{source}: no {what} column (looked for {', '.join(wanted)}; it has {', '.join(columns)}); "
                       f"name it with --{what}-col")


def _has_header(path: str) -> bool:
    """Whether a TSV's first line names its columns (one field is ``url``)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "url" in [c.strip().lower() for c in f.readline().rstrip("\n").split("\t")]


def tsv_to_parquet(path: str, columns: tuple[str, ...], dest: str) -> str:
    """A CC3M / CC12M TSV (headerless as released: its columns are ``columns``) -> a parquet with
    named columns. Quotes are data (captions hold them), not CSV quoting."""
    pa = _pyarrow()
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    named = _has_header(path)
    table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=None if named else list(columns)),
                          parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                          convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns}))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    pq.write_table(table, dest)
    return dest


def _parquet_files(source: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(source, "*.parquet"))) if os.path.isdir(source) else [source]
    if not files or not all(os.path.isfile(f) for f in files):
        raise GetDataError(f"{source}: no parquet file (give a .parquet file or a directory of them)")
    return files


def parquet_columns(source: str, url_col: str | None, caption_col: str | None,
                    extra: list[str] | None) -> tuple[str, str, list[str]]:
    """(url column, caption column, extra columns present) of a LAION-style parquet source:
    ``url``/``URL``, ``caption``/``TEXT`` (relaion's and LAION's spellings) unless named."""
    _pyarrow()
    import pyarrow.parquet as pq

    columns = list(pq.read_schema(_parquet_files(source)[0]).names)
    url = url_col or _find(columns, ("url",), "url", source)
    caption = caption_col or _find(columns, ("caption", "text", "TEXT"), "caption", source)
    extras = extra if extra is not None else [c for c in LAION_EXTRA_COLUMNS if c in columns]
    missing = [c for c in [url, caption, *extras] if c not in columns]
    if missing:
        raise GetDataError(f"{source}: no column {', '.join(missing)} (it has {', '.join(columns)})")
    return url, caption, extras


def draw_subset(source: str, samples: int, seed: int, columns: list[str], dest: str) -> int:
    """``samples`` rows drawn uniformly without replacement (seeded: the same subset every time),
    in file order, of the parquet file(s) ``source`` -> ``dest``. Reads row counts from the
    files' footers and only the rows it keeps' columns. Returns the rows written."""
    import numpy as np
    import pyarrow.parquet as pq

    files = _parquet_files(source)
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = sum(sizes)
    if samples > total:
        raise GetDataError(f"--samples {samples}: {source} holds {total} rows; ask for at most that many")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    writer, start = None, 0
    try:
        for f, n in zip(files, sizes):
            mine = chosen[(chosen >= start) & (chosen < start + n)] - start
            start += n
            if len(mine) == 0:
                continue
            table = pq.read_table(f, columns=columns).take(mine)
            writer = writer or pq.ParquetWriter(dest, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return samples


def karpathy_rows(karpathy: str, split: str, image_base: str) -> list[dict[str, Any]]:
    """COCO's Karpathy split (``dataset_coco.json``) -> one row per image of ``split``: its
    url under ``image_base``, its first caption, all its captions, its COCO id and file name."""
    try:
        with open(karpathy) as f:
            images = json.load(f)["images"]
    except (OSError, ValueError, KeyError) as e:
        raise GetDataError(f"--karpathy {karpathy}: not Karpathy's dataset_coco.json ({type(e).__name__}: {e}); "
                           f"it is in caption_datasets.zip") from e
    rows = []
    for im in images:
        if im.get("split") not in KARPATHY_SPLITS[split]:
            continue
        captions = [s["raw"].strip() for s in im.get("sentences", []) if s.get("raw", "").strip()]
        if not captions:
            continue
        rows.append({"url": f"{image_base.rstrip('/')}/{im['filepath']}/{im['filename']}", "caption": captions[0],
                     "captions": captions, "cocoid": int(im.get("cocoid", -1)), "filename": im["filename"]})
    if not rows:
        raise GetDataError(f"--karpathy {karpathy}: no image of split {split!r} with captions")
    return rows


def coco_url_list(karpathy: str, split: str, image_base: str, dest: str) -> UrlList:
    _pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(karpathy_rows(karpathy, split, image_base)), dest)
    return UrlList(dest, "parquet", "url", "caption", ["captions", "cocoid", "filename"])


def url_list_for(a: argparse.Namespace) -> UrlList:
    """The recipe's url list, written beside ``--out`` (``OUT_urls/``) where it needs one."""
    work = os.path.normpath(a.out) + "_urls"
    if a.recipe == "coco":
        return coco_url_list(a.karpathy, a.split, a.image_base, os.path.join(work, f"coco_{a.split}.parquet"))
    if a.recipe in ("cc3m", "cc12m"):
        order = ("caption", "url") if a.recipe == "cc3m" else ("url", "caption")
        path = tsv_to_parquet(a.url_list, order, os.path.join(work, f"{a.recipe}.parquet"))
        return UrlList(path, "parquet", "url", "caption", a.extra_columns or [])
    fmt = _input_format(a.url_list)
    if fmt != "parquet":
        if a.samples is not None:
            raise GetDataError("--samples draws from parquet url lists; convert the list to parquet first")
        return UrlList(a.url_list, fmt, a.url_col or "url", a.caption_col or "caption", a.extra_columns or [])
    url, caption, extras = parquet_columns(a.url_list, a.url_col, a.caption_col, a.extra_columns)
    if a.samples is None:
        return UrlList(a.url_list, "parquet", url, caption, extras)
    dest = os.path.join(work, f"subset_{a.samples}_seed{a.seed}.parquet")
    draw_subset(a.url_list, a.samples, a.seed, [url, caption, *extras], dest)
    return UrlList(dest, "parquet", url, caption, extras)


def _input_format(path: str) -> str:
    if os.path.isdir(path):
        return "parquet"
    for fmt in ("parquet", "tsv.gz", "csv.gz", "jsonl.gz", "tsv", "csv", "jsonl", "txt"):
        if path.endswith("." + fmt):
            return fmt
    raise GetDataError(f"{path}: unknown url-list format (give .parquet, .csv, .tsv, .jsonl (optionally .gz) or "
                       f".txt, or a directory of .parquet)")


def img2dataset_kwargs(a: argparse.Namespace, urls: UrlList) -> dict[str, Any]:
    """img2dataset.download's arguments for a recipe's url list and the flags."""
    return {
        "url_list": urls.path, "input_format": urls.input_format, "url_col": urls.url_col,
        "caption_col": urls.caption_col, "save_additional_columns": urls.extra_columns or None,
        "output_folder": a.out, "output_format": "webdataset", "image_size": a.image_size,
        "resize_mode": a.resize_mode, "resize_only_if_bigger": a.resize_only_if_bigger,
        "encode_format": "jpg", "encode_quality": a.encode_quality, "processes_count": a.processes,
        "thread_count": a.threads, "number_sample_per_shard": a.samples_per_shard, "retries": a.retries,
        "timeout": a.timeout, "incremental_mode": a.mode, "enable_wandb": a.wandb, "max_shard_retry": 2,
    }


def command_line(kwargs: dict[str, Any]) -> str:
    """The ``img2dataset`` command that does the same (what a user can rerun or adapt)."""
    parts = ["img2dataset"]
    for k, v in kwargs.items():
        if v is None:
            continue
        value = json.dumps(v) if isinstance(v, list) else str(v)
        parts += [f"--{k}", shlex.quote(value)]
    return " ".join(parts)


def _download() -> Any:
    """img2dataset's entry point, or the error naming the extra that installs it."""
    # img2dataset imports albumentations, which would ask PyPI for a newer version of itself
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        from img2dataset import download
    except ImportError as e:
        raise GetDataError(f"img2dataset is not installed: it is an optional extra, install it with `{EXTRA}` "
                           f"(or `pip install img2dataset`) ({e})") from e
    return download


@dataclass
class Written:
    shards: list[str]
    samples: int
    failed: int


def written(out: str) -> Written:
    """The shards under ``out`` and their sample counts, from img2dataset's ``*_stats.json``."""
    shards = sorted(glob.glob(os.path.join(out, "*.tar")))
    samples = failed = 0
    for stats in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
        with open(stats) as f:
            s = json.load(f)
        samples += int(s.get("successes", 0))
        failed += int(s.get("failed_to_download", 0)) + int(s.get("failed_to_resize", 0))
    return Written(shards, samples, failed)


def train_data_spec(shards: list[str]) -> str:
    """A brace range naming the shards, for ``--train-data`` / ``--retrieval``."""
    names = [os.path.splitext(os.path.basename(s))[0] for s in shards]
    folder = os.path.dirname(shards[0])
    return os.path.join(folder, f"{{{names[0]}..{names[-1]}}}.tar" if len(names) > 1 else f"{names[0]}.tar")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="get_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=("cc3m", "cc12m", "laion", "coco", "urls"),
                   help="cc3m / cc12m: the released TSV; laion: LAION / relaion parquet (a file or a directory); "
                        "coco: Karpathy's dataset_coco.json; urls: any csv/tsv/jsonl/parquet url list")
    p.add_argument("--out", required=True, help="the shard directory (OUT/00000.tar, ...)")
    p.add_argument("--url-list", help="the url list: a TSV (cc3m, cc12m), parquet file or directory (laion), any "
                                      "(urls)")
    p.add_argument("--karpathy", help="coco: Karpathy's dataset_coco.json (caption_datasets.zip)")
    p.add_argument("--split", choices=tuple(KARPATHY_SPLITS), default="test",
                   help="coco: the Karpathy split (train = train + restval)")
    p.add_argument("--image-base", default=COCO_IMAGES, help="coco: where the images are (FILEPATH/FILENAME under it)")
    p.add_argument("--samples", type=int, help="laion / urls (parquet): a subset of this many rows, drawn uniformly")
    p.add_argument("--seed", type=int, default=0, help="the subset's seed (the same subset every time)")
    p.add_argument("--url-col", help="the url column (default: url / URL)")
    p.add_argument("--caption-col", help="the caption column (default: caption / TEXT)")
    p.add_argument("--extra-columns", type=lambda s: [c for c in s.split(",") if c],
                   help="columns kept in KEY.json, comma-separated (default for laion: its similarity, punsafe, "
                        "pwatermark, ... where present)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio",
                   help="keep_ratio: the short side to --image-size (default); border: pad to a square with white")
    p.add_argument("--resize-only-if-bigger", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   metavar="BOOL", help="never upscale (default true)")
    p.add_argument("--encode-quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--threads", type=int, default=64, help="download threads per process")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--retries", type=int, default=2, help="download retries per url")
    p.add_argument("--timeout", type=int, default=10, help="seconds per download")
    p.add_argument("--mode", choices=("incremental", "overwrite", "extend"), default="incremental",
                   help="incremental (default): a rerun keeps the finished shards and resumes; overwrite: start over")
    p.add_argument("--wandb", action="store_true", help="log img2dataset's progress to wandb")
    p.add_argument("--print-only", action="store_true", help="write the url list and print the command, do not run")
    return p


def _check_args(a: argparse.Namespace) -> None:
    needs = {"coco": "karpathy"}.get(a.recipe, "url_list")
    if getattr(a, needs) is None:
        raise GetDataError(f"{a.recipe} needs --{needs.replace('_', '-')}")
    if a.samples is not None and a.samples < 1:
        raise GetDataError("--samples must be at least 1")
    if a.samples is not None and a.recipe not in ("laion", "urls"):
        raise GetDataError(f"--samples: {a.recipe} is downloaded whole (a subset is for laion / urls)")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        _check_args(a)
        download = None if a.print_only else _download()  # before writing anything: fail early without it
        urls = url_list_for(a)
        kwargs = img2dataset_kwargs(a, urls)
        print(command_line(kwargs), flush=True)
        if download is None:
            return 0
        download(**kwargs)
        done = written(a.out)
    except GetDataError as e:
        print(f"get_data: error: {e}", file=sys.stderr)
        return 2
    if not done.shards or not done.samples:
        print(f"get_data: error: no sample was downloaded into {a.out} ({done.failed} failed); see img2dataset's "
              f"*_stats.json there for why", file=sys.stderr)
        return 1
    print(f"get_data: {done.samples} samples in {len(done.shards)} shards ({done.failed} urls failed); "
          f"train with --train-data '{train_data_spec(done.shards)}' (the count comes from *_stats.json)")
    return 0
