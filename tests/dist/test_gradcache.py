"""GradCache (``--accum-freq``) on two real ranks under the deepspeed launcher: one launch of
tests/dist/gradcache_ranks.py (DRIP with replayed noise under ZeRO-3; a plain ViT under ZeRO-0
with --local-loss --gather-with-grad, whose feature gradients cross ranks), and a short training
run whose loss curve and final weights are those of the large-batch run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtp_ds.cluster.ports import free_port
from tests.conftest import REPO, base_args, metrics, run_many, step_records

pytestmark = pytest.mark.dist

CASES = ["large:drip:3:fp32", "large:vit:0:fp32:local"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gradcache_ranks")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "dist" / "gradcache_ranks.py"), str(out), *CASES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {case: json.loads((out / f"{case.replace(':', '_')}.json").read_text()) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_gradcache_steps_equal_one_large_batch(ranks, case):
    r = ranks[case]
    assert r["max_update"] > 1e-2
    assert r["max_diff"] < 5e-7, r
    assert r["loss_gradcache"] == pytest.approx(r["loss_reference"], rel=1e-6)
    a, b = r["fingerprints"]
    assert a == b  # the ranks agree


def test_a_gradcache_run_trains_the_large_batch_run(synth, tmp_path):
    """dtp_ds.train with --batch-size 8 --accum-freq 3 against --batch-size 24 (2 ranks, ZeRO-2,
    fp32, AdamW): the same samples per step, the same logged whole-batch loss at every step, the
    same final weights, 3 engine micro-steps per optimizer step. Both runs in one launch."""
    common = ["--precision", "fp32", "--zero-stage", "2", "--max-steps", "4", "--lr", "2e-3",
              "--train-num-samples", "480"]
    large = base_args(synth, tmp_path, "large", *common)
    large[large.index("--batch-size") + 1] = "24"
    chunked = base_args(synth, tmp_path, "gradcache", *common, "--accum-freq", "3")
    chunked[chunked.index("--batch-size") + 1] = "8"
    done = run_many({"large": large, "gradcache": chunked}, tmp_path / "launch")
    assert [r.rc for r in done.values()] == [[0, 0], [0, 0]], {k: r.stderr for k, r in done.items()}
    a, b = step_records(tmp_path / "gradcache"), step_records(tmp_path / "large")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["samples_seen"] for r in a] == [r["samples_seen"] for r in b] == [48 * s for s in range(1, 5)]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4), (x["loss"], y["loss"])
        assert x["lr"] == y["lr"]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)  # the same weights: fp32 rounding only
    fa, fb = metrics(tmp_path / "gradcache")[-1], metrics(tmp_path / "large")[-1]
    assert fa["param_fingerprint_by_rank"][0] == pytest.approx(fb["param_fingerprint_by_rank"][0], rel=1e-5)
    cfg = json.loads((tmp_path / "gradcache" / "config.json").read_text())["ds_config"]
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (8, 3, 48)
