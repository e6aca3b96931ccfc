"""--train-data on object storage: ``pipe:`` shard URLs (open_clip's ``pipe:aws s3 cp s3://... -``
form), their sample count from the remote ``*_stats.json`` fetched the same way, and a resumed
epoch that continues exactly; against moto's S3 server on loopback (no network), and with any
command (``pipe:cat``)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import dtp_ds.data.shards as sh
from dtp_ds.data.shards import (
    Bad,
    DataConfig,
    count_samples,
    make_train_loader,
    plan_epoch,
    read_shard,
    resolve_shards,
    stats_url,
)
from dtp_ds.data.synthetic import write_synthetic_dataset

SHARDS, PER_SHARD = 4, 24


class TinyStage:
    """A sample -> (its image, 8x8, as a tensor; its caption's crc): what the batches are compared by."""

    keys = ("txt",)

    def __call__(self, image, sample):
        pixels = torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32))
        return pixels, torch.tensor([zlib.crc32(sample["txt"])])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe_synth")
    write_synthetic_dataset(out, num_train=SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, val_per_class=0,
                            image_size=32, seed=0)
    return out / "train"


@pytest.fixture(autouse=True)
def _fresh_stats_cache():
    sh._remote_shard_samples.cache_clear()
    yield
    sh._remote_shard_samples.cache_clear()


def _epoch(train_data: str, batches_done: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = DataConfig(train_data=train_data, workers=2)
    urls, _ = resolve_shards(train_data)
    plan = plan_epoch(len(urls) * PER_SHARD, 8, 1, 2, 1)
    loader = make_train_loader(cfg, urls, plan, TinyStage(), micro_batch=8, epoch=1, seed=0, rank=0, world_size=1,
                               batches_done=batches_done)
    return [(images, crcs) for images, crcs, _ in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_the_stats_file_is_named_in_the_shards_own_form():
    assert stats_url("/d/00003.tar") == "/d/00003_stats.json"
    assert stats_url("pipe:aws s3 cp s3://b/cc12m/00003.tar -") == "pipe:aws s3 cp s3://b/cc12m/00003_stats.json -"
    assert stats_url("pipe:cat '/my dir/00003.tar'") == "pipe:cat '/my dir/00003_stats.json'"
    assert stats_url("https://h/x/00003.tar?v=1") == "https://h/x/00003_stats.json?v=1"
    assert stats_url("pipe:curl -s https://h/x/00003.tar | tee copy.tar") is None  # which one?
    assert stats_url("pipe:my_reader shard-3") is None


def test_pipe_shards_count_their_samples_and_train_as_local_shards_do(shards):
    local = f"{shards}/{{00000..{SHARDS - 1:05d}}}.tar"
    piped = f"pipe:cat {shards}/{{00000..{SHARDS - 1:05d}}}.tar"
    urls, missing = resolve_shards(piped)
    assert len(urls) == SHARDS and not missing and urls[0] == f"pipe:cat {shards}/00000.tar"
    assert count_samples(urls) == SHARDS * PER_SHARD
    straight = _epoch(piped)
    assert len(straight) == SHARDS * PER_SHARD // 8
    assert _same(straight, _epoch(local))  # the same batches, in the same order, as the local shards give
    assert _same(_epoch(piped, batches_done=5), straight[5:])  # resumed mid-epoch: exactly the rest


def test_a_failing_pipe_is_an_unreadable_shard_and_an_unknown_count(shards, tmp_path, caplog):
    gone = f"pipe:cat {tmp_path}/00000.tar"
    out = list(read_shard(gone))
    assert len(out) == 1 and isinstance(out[0], Bad) and out[0].kind == "unreadable_shards"
    with caplog.at_level(logging.WARNING, logger="dtp_ds.data.shards"):
        assert count_samples([f"pipe:cat {shards}/00000.tar", gone]) is None
    assert f"{tmp_path}/00000_stats.json" in caplog.text


def test_a_pipe_shard_that_ends_early_is_counted_against_its_remote_stats(shards, tmp_path):
    half = tmp_path / "00000.tar"
    data = (shards / "00000.tar").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    shutil.copy(shards / "00000_stats.json", tmp_path / "00000_stats.json")
    out = list(read_shard(f"pipe:cat {half}"))
    bad = [b for b in out if isinstance(b, Bad)]
    assert len(bad) == 1 and bad[0].kind == "truncated_shards"
    assert bad[0].extra["lost_in_shards"] == PER_SHARD - (len(out) - 1)


@pytest.fixture()
def s3(monkeypatch, shards):
    """moto's S3 on loopback holding the shards and their stats under s3://shards/train/; the
    aws cli pointed at it by AWS_ENDPOINT_URL."""
    moto_server = pytest.importorskip("moto.server", reason='moto not installed (pip install "moto[server]")')
    boto3 = pytest.importorskip("boto3", reason="boto3 not installed (comes with moto[server])")
    aws = shutil.which("aws", path=os.path.dirname(sys.executable)) or shutil.which("aws")
    if aws is None:
        pytest.skip("the aws cli is not installed (pip install awscli)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(k, raising=False)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="shards")
    for f in sorted(shards.iterdir()):
        client.upload_file(str(f), "shards", f"train/{f.name}")
    yield aws
    server.stop()


def test_s3_shards_through_the_aws_cli_count_train_and_resume_exactly(s3, shards):
    """Two shards (each aws cli call takes a second or two): 2 + 2 x 2 + 1 calls."""
    piped = f"pipe:{s3} s3 cp s3://shards/train/{{00001..00002}}.tar -"
    urls, _ = resolve_shards(piped)
    assert count_samples(urls) == 2 * PER_SHARD  # from the remote *_stats.json, through aws s3 cp
    straight = _epoch(piped)
    assert len(straight) == 2 * PER_SHARD // 8
    assert _same(straight, _epoch(f"{shards}/{{00001..00002}}.tar"))
    assert _same(_epoch(piped, batches_done=3), straight[3:])
    assert sh.shard_samples(f"pipe:{s3} s3 cp s3://shards/train/09999.tar -") is None
