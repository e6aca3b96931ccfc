"""``--seqcomp-schedule`` end to end: 2 ranks, ZeRO-2, the plain patch-stem trunk (token
dropout + patch scaling) and DRIP (conv stem: token dropout only) train under a schedule whose
segments change within 10 steps; every row logs the step's strategy and the cumulative cost
units; the schedule's state is in the checkpoint. Both runs share one launch with
tests/dist/test_reducer_protocol.py's (tests/dist/conftest.py)."""
from __future__ import annotations

import pytest

from tests.conftest import base_args, step_records

pytestmark = pytest.mark.dist


# model -> (schedule, patch size at the last segment, patch size under seqcomp)
CASES = {"PatchStem-ViT-Tiny-8": ("0.04:r=0.5,p=16;0.04:r=0.25", 8, 16),
         "DRIP-ViT-Tiny-8-4x": ("0.04:r=0.5;0.04:r=0.25", 8, 8)}


def planned_runs(synth, logs) -> dict[str, list[str]]:
    """This module's runs (model -> argv), trained in tests/dist/conftest.py's shared launch."""
    todo = {}
    for model, (spec, _, _) in CASES.items():
        args = base_args(synth, logs, model, "--zero-stage", "2", "--precision", "fp32", "--max-steps", "10",
                         "--lr", "2e-3", "--seqcomp-schedule", spec, "--lr-scheduler", "poly")
        args[args.index("--model") + 1] = model
        todo[model] = args
    return todo


@pytest.fixture(scope="module")
def runs(shared_launch):
    return {model: shared_launch[model] for model in CASES}


@pytest.mark.parametrize("model", list(CASES))
def test_a_seqcomp_schedule_trains_and_is_logged(runs, model):
    import torch

    _, p0, p = CASES[model]
    assert runs[model].rc == [0, 0], runs[model].stderr
    run = runs[model].dir
    rows = step_records(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    # 75 steps in the run (2,400 samples, 2 x 16 a step): segments end at steps 3 and 6, then full-sequence
    assert [r["seqcomp_r"] for r in rows] == [0.5] * 3 + [0.25] * 3 + [0.0] * 4
    assert [r["seqcomp_p"] for r in rows] == [p] * 3 + [p0] * 7
    costs = [r["seqcomp_cost"] for r in rows]
    assert costs[0] < costs[3] < costs[6] == costs[-1] == 1.0
    assert rows[-1]["cost_units"] == pytest.approx(3 * costs[0] + 3 * costs[3] + 4)
    tokens = [r["image_tokens"] for r in rows]
    assert tokens[0] < tokens[3] < tokens[6] == tokens[-1]
    if model.startswith("PatchStem"):
        assert tokens[:7] == [9.0] * 3 + [49.0] * 3 + [65.0]  # 4x4 grid keeps 8; 64 keep 48; all 64
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    ckpt = run / "checkpoints" / "step_00000010"
    states = torch.load(next(ckpt.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    saved = states["schedules"]["seqcomp"]
    assert saved["step_done"] == 10 and saved["ends"] == [3, 6, 75]
    assert saved["cost_units"] == pytest.approx(rows[-1]["cost_units"])
