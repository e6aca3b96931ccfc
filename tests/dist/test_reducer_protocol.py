"""The reducer seam: a reducer written in a test's own file trains a CLIP model on 2 ranks
under ZeRO-2 through the unchanged trainer; its auxiliary loss, statistics and token counts
reach the metrics."""
from __future__ import annotations

import json

import pytest

from tests.conftest import base_args, run_train, step_records

pytestmark = pytest.mark.dist


def test_a_reducer_of_ones_own_trains_under_zero2(synth, tmp_path):
    with open("dtp_ds/models/configs/ViT-Tiny-8.json") as f:
        cfg = json.load(f)
    cfg["vision_cfg"]["reducer_cfg"] = {"type": "tests.dist.toy_reducer:StrideReducer", "at": 2, "stride": 2}
    model = tmp_path / "Stride-ViT-Tiny-8.json"
    model.write_text(json.dumps(cfg))
    args = base_args(synth, tmp_path, "toy", "--zero-stage", "2", "--precision", "fp32", "--max-steps", "6",
                     "--lr", "2e-3")
    args[args.index("--model") + 1] = str(model)
    run_train(args)
    rows = step_records(tmp_path / "toy")
    assert [r["step"] for r in rows] == list(range(1, 7))
    # 64 patches: blocks 0-1 see 65 tokens, blocks 2-5 CLS + 32
    assert rows[-1]["image_tokens"] == pytest.approx((2 * 65 + 4 * 33) / 6)
    assert rows[-1]["kept_fraction"] == pytest.approx(0.5)
    assert all(r["loss"] == pytest.approx(r["contrastive_loss"] + r["gate_loss"], rel=1e-5) for r in rows)
    assert rows[-1]["gate_loss"] < rows[0]["gate_loss"]  # the reducer's own parameter learned
    saved = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert saved["model_cfg"]["vision_cfg"]["reducer_cfg"]["type"] == "tests.dist.toy_reducer:StrideReducer"
