"""tools/boundary_ablation end to end, small: one arm at two seeds trained by the real launcher,
re-evaluated under every rule; the interval and the paired differences recomputed from the
metrics files the runs wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from tests.conftest import REPO

pytestmark = pytest.mark.dist


def test_ablation_tool_runs_seeds_and_rules(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "abl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools/boundary_ablation"), "--data", str(synth), "--out",
                           str(out), "--arms", "mlp-cumsum", "--seeds", "2", "--steps", "3", "--batch-size", "16",
                           "--warmup", "1", "--nproc", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "rows.json").read_text())
    arms = result["arms"]
    assert result["seeds"] == [0, 1] and result["reference"] == "mlp-cumsum"
    assert list(arms) == ["mlp-cumsum", "mlp-cumsum/expected", "mlp-cumsum/threshold", "mlp-cumsum/sample"]
    own = arms["mlp-cumsum"]
    evals = {s: [json.loads(line) for line in (out / "runs" / f"mlp-cumsum-s{s}" / "metrics.jsonl").open()
                 if '"zeroshot_top1"' in line][-1] for s in (0, 1)}
    losses = {s: next(json.loads(line)["loss"] for line in (out / "runs" / f"mlp-cumsum-s{s}" / "metrics.jsonl")
                      .open() if '"loss"' in line) for s in (0, 1)}
    assert losses[0] != losses[1]  # the seed changed initialisation and data order
    for key in ("zeroshot_top1", "zeroshot_compression", "layout_top1"):
        vals = np.array([evals[0][key], evals[1][key]])
        assert own[key] == {"0": vals[0], "1": vals[1]}
        assert own[f"{key}_mean"] == pytest.approx(vals.mean())
        if vals[0] != vals[1]:  # the 95% t interval at n = 2: mean +- t(0.975, 1) sd / sqrt(2)
            half = student_t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2)
            assert own[f"{key}_ci95"] == pytest.approx([vals.mean() - half, vals.mean() + half])
    # the trainer's own evaluation used the default rule: re-evaluated under it, every seed's difference is 0
    expected = arms["mlp-cumsum/expected"]
    assert expected["zeroshot_compression_diff_mean"] == 0.0 and expected["zeroshot_compression_separated"] is False
    # three steps from the prior: the threshold rule collapses every image to one segment on both seeds
    threshold = arms["mlp-cumsum/threshold"]
    assert threshold["zeroshot_compression"] == {"0": 64.0, "1": 64.0}
    assert threshold["zeroshot_compression_diff_mean"] == pytest.approx(64.0 - own["zeroshot_compression_mean"])
    assert "| mlp-cumsum/threshold" in proc.stdout and "+- " in proc.stdout and "(2)" in proc.stdout
    assert "mlp-cumsum/threshold - mlp-cumsum, shapes top-1:" in proc.stdout and "over 2 seeds" in proc.stdout
