"""tools/bench_engine's reports: rates grouped by round, ratios taken within a round (so load
that drifts between rounds cancels), and an arm that did not run (one large batch out of
memory) reported as such, with no ratio."""
from __future__ import annotations

import argparse
import json

import pytest

from dtp_ds.bench.engine import GC, LARGE, PLAIN, report_accum, report_engine


def _args(as_json: bool, repeats: int = 1) -> argparse.Namespace:
    return argparse.Namespace(model="ViT-Tiny-8", precision="fp32", zero_stages=[0], nproc=2, batch_size=16,
                              accum_freq=4, steps=12, skip=3, repeats=repeats, json=as_json)


def test_time_ratios_are_paired_within_rounds(capsys):
    # round 2 ran on a machine twice as loaded: every rate halves, the ratios do not move
    report_accum(_args(True, 2), {GC: [[15.0, 16.0, 17.0], [7.5, 8.0, 8.5]], PLAIN: [[20.0, 21.0], [10.0, 10.5]],
                                  LARGE: [[24.0], [12.0]]})
    out = json.loads(capsys.readouterr().out)
    assert out["samples_per_s_per_round"][GC] == [16.0, 8.0]
    assert out["time_ratio"] == pytest.approx({f"{GC} / {PLAIN}": 20.5 / 16.0, f"{GC} / {LARGE}": 24.0 / 16.0})
    assert out["time_ratio_ci95"][f"{GC} / {PLAIN}"] == pytest.approx([20.5 / 16.0] * 2)
    # the pooled median rate spans both rounds' levels
    lo, hi = out["samples_per_s_ci95"][GC]
    assert lo <= 8.5 and hi >= 15.0


def test_a_large_batch_that_did_not_run_has_no_ratio(capsys):
    report_accum(_args(False), {GC: [16.0], PLAIN: [20.0], LARGE: []})
    table = capsys.readouterr().out
    assert "did not fit" in table and f"{GC} / {PLAIN}: 1.25 (1)x" in table and f"/ {LARGE}" not in table


def test_the_engine_target_is_called_only_outside_the_interval(capsys):
    ours, ref = "dtp_ds (DeepSpeed ZeRO-0, fp32)", "open_clip_train (DDP, fp32)"
    a = _args(True, 3)
    # per round: 0.90, 0.92, 0.91 of the reference: wholly below 0.95
    report_engine(a, {ours: [[90.0], [92.0], [91.0]], ref: [[100.0], [100.0], [100.0]]}, ref)
    out = json.loads(capsys.readouterr().out)
    assert out["ratio_to_open_clip_train"][ours] == pytest.approx(0.91) and out["verdict"][ours] == "misses"
    # 0.90, 1.00, 0.95: the interval straddles 0.95
    report_engine(a, {ours: [[90.0], [100.0], [95.0]], ref: [[100.0], [100.0], [100.0]]}, ref)
    assert json.loads(capsys.readouterr().out)["verdict"][ours] == "not separated"
