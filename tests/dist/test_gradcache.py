"""GradCache (``--accum-freq``) on two real ranks under the deepspeed launcher, in one launch:
tests/dist/gradcache_ranks.py's cases (DRIP with replayed noise under ZeRO-3; a plain ViT under
ZeRO-0 with --local-loss --gather-with-grad, whose feature gradients cross ranks), then a short
training run whose loss curve and final weights are those of the large-batch run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_args, metrics, run_many, step_records

pytestmark = pytest.mark.dist

CASES = ["large:drip:3:fp32", "large:vit:0:fp32:local"]


@pytest.fixture(scope="module")
def launch(synth, tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """One launch of 2 ranks: tests/dist/gradcache_ranks.py's CASES, then the two training runs of
    test_a_gradcache_run_trains_the_large_batch_run (tests/dist/train_runs.py)."""
    out = tmp_path_factory.mktemp("gradcache_ranks")
    common = ["--precision", "fp32", "--zero-stage", "2", "--max-steps", "4", "--lr", "2e-3",
              "--train-num-samples", "480"]
    large = base_args(synth, out, "large", *common)
    large[large.index("--batch-size") + 1] = "24"
    chunked = base_args(synth, out, "gradcache", *common, "--accum-freq", "3")
    chunked[chunked.index("--batch-size") + 1] = "8"
    done = run_many({"large": large, "gradcache": chunked}, out / "launch",
                    calls=[["tests.dist.gradcache_ranks:run_cases", str(out), *CASES]])
    assert [r.rc for r in done.values()] == [[0, 0], [0, 0]], {k: r.stderr for k, r in done.items()}
    return {case: json.loads((out / f"{case.replace(':', '_')}.json").read_text()) for case in CASES}, out


@pytest.fixture(scope="module")
def ranks(launch) -> dict[str, dict]:
    return launch[0]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_gradcache_steps_equal_one_large_batch(ranks, case):
    r = ranks[case]
    assert r["max_update"] > 1e-2
    assert r["max_diff"] < 5e-7, r
    assert r["loss_gradcache"] == pytest.approx(r["loss_reference"], rel=1e-6)
    a, b = r["fingerprints"]
    assert a == b  # the ranks agree


def test_a_gradcache_run_trains_the_large_batch_run(launch):
    """dtp_ds.train with --batch-size 8 --accum-freq 3 against --batch-size 24 (2 ranks, ZeRO-2,
    fp32, AdamW): the same samples per step, the same logged whole-batch loss at every step, the
    same final weights, 3 engine micro-steps per optimizer step. Both runs in the module's launch."""
    tmp_path = launch[1]
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
