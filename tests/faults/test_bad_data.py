"""Point 2 (bad data) and point 5 (secrets), on real runs over really damaged shards.

The damaged dataset: 12 shards of 20 samples; shard 0 has 3 corrupt JPEGs, shard 1 two
samples without caption, shard 2 is cut off inside sample 10's image, shard 3 is a
directory, shard 4 is missing from the brace range, and a ``pipe:`` source (carrying a
token, as such sources do) fails to produce anything.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dtp_ds.data.synthetic import write_synthetic_dataset
from tests.conftest import TINY_DS_CONFIG
from tests.faults import corrupt
from tests.faults.conftest import config, error_lines, records, run, run_ok, steps

pytestmark = pytest.mark.dist  # real runs under the deepspeed launcher

PER_SHARD = 20
SECRETS = {"WANDB_API_KEY": "wandb-key-0123456789abcdef", "HF_TOKEN": "hf_tokenvalue987654321",
           "MY_SERVICE_SECRET": "service-secret-value-42", "DB_PASSWORD": "db-pass-word-31337"}
ARG_SECRET = "argtoken-7f3a9c1e5d"  # inside a shard source on the command line
OUR_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) ")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("damaged")
    write_synthetic_dataset(out, num_train=12 * PER_SHARD, samples_per_shard=PER_SHARD, val_per_class=1,
                            image_size=64, seed=0)
    train = out / "train"
    shards = sorted(train.glob("*.tar"))
    facts = {
        "decode": corrupt.corrupt_jpegs(shards[0], 3),
        "no_caption": corrupt.drop_captions(shards[1], 2),
    }
    corrupt.truncate(shards[2], 10)
    corrupt.replace_with_directory(shards[3])
    corrupt.remove(shards[4])
    facts["damaged"] = [str(p) for p in shards[:4]]
    facts["missing"] = [str(shards[4])]
    return train, facts


def _args(train: Path, logs: Path, name: str, *extra: str) -> list[str]:
    data = f"{train}/{{00000..00011}}.tar::pipe:env API_TOKEN={ARG_SECRET} cat {train}/gone/{{00000..00001}}.tar"
    return ["--deepspeed_config", TINY_DS_CONFIG, "--model", "ViT-Tiny-8", "--train-data", data, "--logs", str(logs),
            "--name", name, "--batch-size", "16", "--workers", "1", "--warmup", "2", "--log-every-n-steps", "1",
            "--eval-frequency", "0", "--precision", "fp32", "--zero-stage", "0", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def tolerant_run(damaged, tmp_path_factory):
    """12 steps (192 samples: more than the 185 good ones, so every damage is met at least
    once) with --max-bad-fraction 0.3, secrets in the environment and wandb offline."""
    train, _ = damaged
    logs = tmp_path_factory.mktemp("logs")
    proc = run_ok(_args(train, logs, "tolerant", "--train-num-samples", "192", "--max-bad-fraction", "0.3",
                        "--report-to", "wandb"), env={**SECRETS, "WANDB_MODE": "offline"})
    return logs / "tolerant", proc


def test_bad_data_is_skipped_counted_and_warned_once(damaged, tolerant_run):
    _, facts = damaged
    run_dir, proc = tolerant_run
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # trained to the end, on good samples only
    by = rows[-1]["bad_by_kind"]
    # every damage met at least once (a second pass over the shards may count some again)
    assert 3 <= by["decode_error"] <= 6 and 2 <= by["no_caption"] <= 4, by
    assert 1 <= by["truncated_shards"] <= 2 and 2 <= by["unreadable_shards"] <= 6, by  # shard 3 + the pipe: source
    assert by["lost_in_shards"] >= PER_SHARD + (PER_SHARD - 10), by  # the directory's 20, the cut shard's last 10
    assert rows[-1]["bad_samples"] == sum(by.get(k, 0) for k in ("decode_error", "no_caption", "no_image",
                                                                  "lost_in_shards"))
    assert all(a["bad_samples"] <= b["bad_samples"] for a, b in zip(rows, rows[1:]))
    assert records(run_dir)[-1]["bad_by_kind"] == by  # the final record too
    cfg = config(run_dir)
    assert cfg["missing_shards"] == facts["missing"] and cfg["shards"] == 11 + 2
    assert all(r["missing_shards"] == 1 for r in rows)
    # one warning per damaged shard, naming it, whatever the number of passes over it
    warnings = [line for line in proc.stderr.splitlines() if "bad data in shard" in line]
    for shard in facts["damaged"]:
        assert sum(f"shard {shard} (" in line for line in warnings) == 1, (shard, warnings)
    assert sum("shard pipe:" in line for line in warnings) == 2
    assert any("truncated_shards: ends early after 10 samples of 20" in line or
               "truncated_shards: ReadError" in line for line in warnings), warnings
    assert any(f"shard {facts['damaged'][3]} (unreadable_shards: OSError: not a regular file (directory)" in line
               for line in warnings)
    missing_warning = [line for line in proc.stderr.splitlines() if "do not exist and are skipped" in line]
    assert missing_warning and facts["missing"][0] in missing_warning[0]


def test_too_much_bad_data_stops_the_run_with_a_clear_error(tmp_path):
    out = tmp_path / "data"
    write_synthetic_dataset(out, num_train=6 * PER_SHARD, samples_per_shard=PER_SHARD, val_per_class=1,
                            image_size=64, seed=1)
    for shard in sorted((out / "train").glob("*.tar")):
        corrupt.corrupt_jpegs(shard, 6)  # 30% of the images cannot be decoded
    logs = tmp_path / "logs"
    args = ["--deepspeed_config", TINY_DS_CONFIG, "--model", "ViT-Tiny-8", "--train-data",
            f"{out}/train/{{00000..00005}}.tar", "--logs", str(logs), "--name", "garbage", "--batch-size", "16",
            "--workers", "1", "--log-every-n-steps", "1", "--eval-frequency", "0", "--precision", "fp32",
            "--zero-stage", "0", "--max-steps", "8", "--save-every-n-steps", "1"]
    proc = run(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "bad data:" in errors[0] and "--max-bad-fraction 0.05" in errors[0], proc.stderr[-2000:]
    assert "decode_error" in errors[0] and "Traceback" not in proc.stderr
    rows = steps(logs / "garbage")
    assert rows and rows[-1]["step"] < 8 and rows[-1]["bad_by_kind"]["decode_error"] > 0.05 * 96
    # it stopped there: no checkpoint of the step that crossed the line (saves come after the check)
    latest = logs / "garbage" / "checkpoints" / "latest"
    assert (int(latest.read_text()[5:]) if latest.exists() else 0) == rows[-1]["step"] - 1


def test_secrets_never_reach_the_run_directory_or_our_logs(tolerant_run):
    run_dir, proc = tolerant_run
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote nothing: the test would prove nothing"
    needles = [v.encode() for v in [*SECRETS.values(), ARG_SECRET]]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.name == "config.json" for p in files)
    leaks = [(str(p), n.decode()) for p in files for n in needles if n in p.read_bytes()]
    assert not leaks, leaks
    ours = [line for line in proc.stderr.splitlines() if OUR_LOG_LINE.match(line)]
    assert ours and not [line for line in ours for n in needles if n.decode() in line]
    cfg_text = (run_dir / "config.json").read_text()
    assert "API_TOKEN=***" in cfg_text  # redacted where it was, not dropped

