"""tools/bench_engine --accum-freq's report: times per sample and their ratios, and an arm
that did not run (one large batch out of memory) reported as such, with no ratio."""
from __future__ import annotations

import argparse
import json

import pytest

from dtp_ds.bench.engine import GC, LARGE, PLAIN, report_accum


def _args(as_json: bool) -> argparse.Namespace:
    return argparse.Namespace(model="ViT-Tiny-8", precision="fp32", zero_stages=[0], nproc=2, batch_size=16,
                              accum_freq=4, steps=12, skip=3, repeats=1, json=as_json)


def test_ratios_are_times_per_sample(capsys):
    report_accum(_args(True), {GC: [15.0, 16.0, 17.0], PLAIN: [20.0, 21.0], LARGE: [24.0]})
    out = json.loads(capsys.readouterr().out)
    assert out["ms_per_sample"][GC] == pytest.approx(1e3 / 16.0)
    assert out["time_ratio"] == pytest.approx({f"{GC} / {PLAIN}": 20.5 / 16.0, f"{GC} / {LARGE}": 24.0 / 16.0})


def test_a_large_batch_that_did_not_run_has_no_ratio(capsys):
    report_accum(_args(False), {GC: [16.0], PLAIN: [20.0], LARGE: []})
    table = capsys.readouterr().out
    assert "did not fit" in table and f"{GC} / {PLAIN}: 1.25x" in table and f"/ {LARGE}" not in table
