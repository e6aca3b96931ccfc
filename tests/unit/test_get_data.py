"""tools/get_data against a loopback HTTP server (no network): img2dataset downloads generated
images into shards that dtp_ds's shard reader reads, whose *_stats.json count is right, that
train as they are (the training loader) and that retrieval reads with all of COCO's captions."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtp_ds.data import get_data
from dtp_ds.data.decode import decode_sample
from dtp_ds.data.shards import Bad, DataConfig, count_samples, make_train_loader, plan_epoch, read_shard, resolve_shards

ROOT = Path(__file__).resolve().parents[2]
HAVE_IMG2DATASET = importlib.util.find_spec("img2dataset") is not None
needs_img2dataset = pytest.mark.skipif(not HAVE_IMG2DATASET,
                                       reason="img2dataset is not installed (pip install .[data]); the download "
                                              "tests need it")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # (no request log in the test output)
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A loopback HTTP server over a directory of generated images: 10 JPEGs, 1 transparent PNG,
    and no file behind ``missing.jpg``."""
    root = tmp_path_factory.mktemp("www")
    (root / "val2014").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(root / f"img{i}.jpg")
        Image.new("RGB", (48, 32), (20 * i, 0, 0)).save(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24, 3] = 255  # black strokes on a transparent background
    Image.fromarray(rgba, "RGBA").save(root / "logo.png")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "get_data"), *args, "--processes", "1", "--threads",
                           "4", "--timeout", "5", "--retries", "0"], capture_output=True, text=True, env=env,
                          timeout=240)


def _samples(out: Path) -> list[dict]:
    found = []
    for shard in sorted(out.glob("*.tar")):
        for sample in read_shard(str(shard)):
            assert not isinstance(sample, Bad), sample
            found.append(sample)
    return found


class _Stage:
    keys = ("txt",)

    def __call__(self, image, sample):
        import torch

        return (torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)),)


@needs_img2dataset
@pytest.mark.run  # img2dataset's spawned processes: ~10 s a download here
def test_a_csv_url_list_becomes_shards_that_read_count_and_train(server, tmp_path):
    urls = tmp_path / "list.csv"
    rows = [(f"{server}/img{i}.jpg", f"random picture {i}") for i in range(10)]
    rows += [(f"{server}/logo.png", "a black square logo"), (f"{server}/missing.jpg", "gone")]
    urls.write_text("url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in rows))
    out = tmp_path / "shards"
    r = _run("urls", "--url-list", str(urls), "--out", str(out), "--samples-per-shard", "5", "--image-size", "32")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "img2dataset --url_list" in r.stdout and "--output_format webdataset" in r.stdout
    assert "get_data: 11 samples in 3 shards (1 urls failed)" in r.stdout
    shards = sorted(str(p) for p in out.glob("*.tar"))
    assert count_samples(shards) == 11  # the *_stats.json successes, as --train-data counts them
    samples = _samples(out)
    assert len(samples) == 11
    captions = {decode_sample(s)[1]["txt"] for s in samples}
    assert captions == {c for _, c in rows[:-1]}
    logo = next(s for s in samples if s["txt"] == b"a black square logo")
    image, _ = decode_sample(logo)
    px = np.asarray(image).astype(int)
    assert min(image.size) == 32 and (px[0, 0] > 240).all() and (px[16, 16] < 15).all()  # on white, as we decode
    # they train as they are: the spec get_data prints, the loader's full epoch
    spec = r.stdout.split("--train-data '")[1].split("'")[0]
    found, _ = resolve_shards(spec)
    assert found == shards
    plan = plan_epoch(11, 4, 1, 1, 1)
    batches = list(make_train_loader(DataConfig(train_data=spec, workers=1), found, plan, _Stage(), micro_batch=4,
                                     epoch=0, seed=0, rank=0, world_size=1))
    assert len(batches) == plan.batches_per_rank and all(int(b[-1]) == 0 for b in batches)
    # incremental: after an interruption (a shard without its stats) the same command redoes that
    # shard only and keeps the finished ones
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"}
    for p in out.glob("00001*"):
        p.unlink()
    r = _run("urls", "--url-list", str(urls), "--out", str(out), "--samples-per-shard", "5", "--image-size", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00001.tar"} == kept
    assert (out / "00001.tar").exists() and count_samples(shards) == 11


@needs_img2dataset
@pytest.mark.run
def test_coco_karpathy_test_split_keeps_every_caption_for_retrieval(server, tmp_path):
    from dtp_ds.eval.retrieval import captions_of

    karpathy = tmp_path / "dataset_coco.json"
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
               "split": "test" if i < 4 else "restval",
               "sentences": [{"raw": f"image {i} caption {k} "} for k in range(5)]} for i in range(6)]
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    out = tmp_path / "coco_test"
    r = _run("coco", "--karpathy", str(karpathy), "--split", "test", "--image-base", server, "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    samples = _samples(out)
    assert count_samples(sorted(str(p) for p in out.glob("*.tar"))) == len(samples) == 4
    for s in samples:
        i = json.loads(s["json"])["cocoid"]
        assert s["txt"].decode() == f"image {i} caption 0"
        assert captions_of(s) == [f"image {i} caption {k}" for k in range(5)]


def _laion(tmp_path: Path, server: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "laion"
    folder.mkdir()
    for part in range(2):
        idx = range(part * 5, part * 5 + 5)
        pq.write_table(pa.table({"URL": [f"{server}/img{i}.jpg" for i in idx], "TEXT": [f"laion {i}" for i in idx],
                                 "similarity": [0.3 + i / 100 for i in idx], "hash": list(idx)}),
                       folder / f"part-{part:05d}.parquet")
    return folder


@needs_img2dataset
@pytest.mark.run
def test_a_laion_subset_of_n_samples_with_its_extra_columns(server, tmp_path):
    source = _laion(tmp_path, server)
    out = tmp_path / "laion_6"
    r = _run("laion", "--url-list", str(source), "--samples", "6", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    samples = _samples(out)
    assert count_samples(sorted(str(p) for p in out.glob("*.tar"))) == len(samples) == 6
    metas = [json.loads(s["json"]) for s in samples]
    assert all("similarity" in m and "hash" not in m for m in metas)
    assert {s["txt"].decode() for s in samples} == {f"laion {int(round((m['similarity'] - 0.3) * 100))}"
                                                    for m in metas}


def test_the_subset_is_seeded_uniform_and_reads_laion_and_relaion_column_names(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow comes with img2dataset (pip install .[data])")
    import pyarrow.parquet as pq

    source = _laion(tmp_path, "http://x")
    assert get_data.parquet_columns(str(source), None, None, None) == ("URL", "TEXT", ["similarity"])
    rows = []
    for seed in (3, 3, 4):
        dest = tmp_path / f"s{seed}-{len(rows)}.parquet"
        assert get_data.draw_subset(str(source), 6, seed, ["URL", "TEXT"], str(dest)) == 6
        rows.append(pq.read_table(dest).column("TEXT").to_pylist())
    assert rows[0] == rows[1] != rows[2] and len(set(rows[0])) == 6
    assert rows[0] == sorted(rows[0], key=lambda t: int(t.split()[1]))  # file order kept
    with pytest.raises(get_data.GetDataError, match="holds 10 rows"):
        get_data.draw_subset(str(source), 11, 0, ["URL"], str(tmp_path / "x.parquet"))


def test_headerless_cc3m_and_cc12m_tsvs_get_their_column_names(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow comes with img2dataset (pip install .[data])")
    import pyarrow.parquet as pq

    cc3m = tmp_path / "Train_GCC-training.tsv"
    cc3m.write_text('a "quoted" caption\thttp://h/1.jpg\nsecond\thttp://h/2.jpg\n')
    table = pq.read_table(get_data.tsv_to_parquet(str(cc3m), ("caption", "url"), str(tmp_path / "o" / "a.parquet")))
    assert table.column("url").to_pylist() == ["http://h/1.jpg", "http://h/2.jpg"]
    assert table.column("caption").to_pylist()[0] == 'a "quoted" caption'
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("url\tcaption\nhttp://h/3.jpg\tthird\n")  # a header already: kept
    table = pq.read_table(get_data.tsv_to_parquet(str(cc12m), ("url", "caption"), str(tmp_path / "o" / "b.parquet")))
    assert table.column("caption").to_pylist() == ["third"]


def test_print_only_gives_the_img2dataset_command_and_missing_inputs_name_the_flag(tmp_path, capsys):
    urls = tmp_path / "list.parquet"
    assert get_data.main(["cc3m", "--out", str(tmp_path / "o")]) == 2
    assert "cc3m needs --url-list" in capsys.readouterr().err
    assert get_data.main(["coco", "--out", str(tmp_path / "o"), "--samples", "5", "--karpathy", "k.json"]) == 2
    assert "downloaded whole" in capsys.readouterr().err
    (tmp_path / "list.txt").write_text("http://h/1.jpg\n")
    assert get_data.main(["urls", "--url-list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "o"),
                          "--print-only", "--image-size", "384", "--resize-mode", "border"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("img2dataset --url_list") and "--input_format txt" in line
    assert "--image_size 384 --resize_mode border" in line and "--incremental_mode incremental" in line
    assert not urls.exists()


def test_without_img2dataset_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import img2dataset -> ImportError
    (tmp_path / "list.txt").write_text("http://h/1.jpg\n")
    assert get_data.main(["urls", "--url-list", str(tmp_path / "list.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install .[data]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
