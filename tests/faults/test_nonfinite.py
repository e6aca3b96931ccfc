"""Point 3: numbers. Non-finite losses are injected for real (``DTP_DS_FAULT_NONFINITE``
adds ``+inf`` to the loss before the backward pass); fp16 overflow is real (an initial loss
scale far too high for the gradients). The two-rank runs share one launch, the one-rank runs
another (tests/dist/train_runs.py); the injection is read per run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dtp_ds.train.checkpoint import _deepspeed_safe_globals
from dtp_ds.train.schedule import warmup_cosine
from tests.conftest import TINY_DS_CONFIG, run_many
from tests.faults.conftest import FAST_ENV, base, records, steps

pytestmark = pytest.mark.dist  # real runs under the deepspeed launcher

CLIENT_KEYS = {"train_state", "global_steps", "global_samples", "skipped_steps", "iteration", "ds_version",
               "ds_config", "model_name", "model_cfg"}


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) in a checkpoint structure, by path; objects by their __dict__."""
    out: dict[str, object] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if (prefix == "" and k in CLIENT_KEYS) or k == "overflow":  # the flag of the last step
                continue
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    elif hasattr(obj, "__dict__"):
        out.update(_tensors(vars(obj), f"{prefix}/."))
    elif isinstance(obj, (int, float)):
        out[prefix] = obj
    return out


def engine_state(ckpt: Path) -> dict[str, object]:
    """Weights, optimizer state (moments, masters, step counts), LR-schedule state and loss
    scale of a checkpoint: everything a skipped step must leave as it was."""
    out = {}
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for f in sorted(ckpt.glob("*states.pt")):
            out.update({f.name + k: v for k, v in _tensors(torch.load(f, weights_only=True)).items()})
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _lrs_follow_the_schedule(rows: list[dict], base_lr: float, warmup: int, total: int) -> None:
    """The LR of each step is the schedule's at (applied steps before it): skipped steps hold it."""
    skipped_before = 0
    for r in rows:
        assert r["lr"] == pytest.approx(warmup_cosine(r["step"] - 1 - skipped_before, base_lr, warmup, total),
                                        rel=1e-9), (r["step"], skipped_before)
        skipped_before = r["skipped_steps"]


def _offload_config(tmp_path: Path) -> str:
    """tiny.json with the optimizer offload of the V100 H-14 config (ZeRO-1, the optimizer on
    the CPU: DeepSpeedCPUAdam), read from the shipped file."""
    h14 = json.loads((Path(TINY_DS_CONFIG).parent / "vit_h_14_fp16.json").read_text())
    cfg = json.loads(Path(TINY_DS_CONFIG).read_text())
    cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage": h14["zero_optimization"]["stage"],
                                "offload_optimizer": h14["zero_optimization"]["offload_optimizer"]}
    cfg["optimizer"]["params"] = {k: v for k, v in cfg["optimizer"]["params"].items() if k != "fused"}
    cfg["optimizer"]["params"]["torch_adam"] = h14["optimizer"]["params"]["torch_adam"]
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# Every optimizer path a shipped config takes: ZeRO-1 (the shipped default), ZeRO-2 (tiny.json),
# ZeRO-3, and the V100 H-14 config's CPU offload (DeepSpeedCPUAdam). bf16 asked for explicitly:
# on a CPU without native bf16 the default precision would be fp32.
ZEROS = ["1", "2", "3", "offload"]


@pytest.fixture(scope="module")
def two_ranks(synth, tmp_path_factory):
    """2 ranks, bf16, micro-batch 4; +inf in rank 0's loss only, at step 2; one run per ZeRO path."""
    logs = tmp_path_factory.mktemp("nonfinite2")
    todo = {}
    for zero in ZEROS:
        args = base(synth, logs, f"nf-{zero}", "--precision", "bf16", "--lr", "2e-3", "--max-steps", "3",
                    "--batch-size", "4", "--save-every-n-steps", "1")
        if zero == "offload":
            args[args.index("--deepspeed_config") + 1] = _offload_config(logs)
        else:
            args += ["--zero-stage", zero]
        todo[zero] = args
    return run_many(todo, logs / "launch", env={**FAST_ENV, "DTP_DS_FAULT_NONFINITE": "2@0"})


@pytest.fixture(scope="module")
def one_rank(synth, tmp_path_factory):
    """1 rank, ZeRO-0: +inf at steps 3-5 in fp32 (the run stops), and fp16 overflow (absorbed)."""
    logs = tmp_path_factory.mktemp("nonfinite1")
    stop = base(synth, logs, "stop", "--precision", "fp32", "--zero-stage", "0", "--lr", "2e-3", "--max-steps",
                "8", "--save-every-n-steps", "2", "--max-nonfinite-steps", "3")
    cfg = json.loads(Path(TINY_DS_CONFIG).read_text())
    cfg["bf16"] = {"enabled": False}
    cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 19, "hysteresis": 1}
    (logs / "fp16.json").write_text(json.dumps(cfg))
    fp16 = base(synth, logs, "fp16", "--zero-stage", "0", "--lr", "1e-3", "--max-steps", "6",
                "--max-nonfinite-steps", "2")
    fp16[fp16.index("--deepspeed_config") + 1] = str(logs / "fp16.json")
    return run_many({"stop": stop, "fp16": fp16}, logs / "launch", nproc=1, env=FAST_ENV,
                    run_env={"stop": {"DTP_DS_FAULT_NONFINITE": "3-5"}, "fp16": {"DTP_DS_ALLOW_EMULATED_FP16": "1"}})


@pytest.mark.parametrize("zero", ZEROS)
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(two_ranks, zero):
    assert two_ranks[zero].rc == [0, 0], two_ranks[zero].stderr
    run_dir = two_ranks[zero].dir
    ds = json.loads((run_dir / "config.json").read_text())["ds_config"]
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == (1 if zero == "offload" else int(zero))
    # DeepSpeed builds DeepSpeedCPUAdam for the ds_config's AdamW under an optimizer offload without torch_adam
    assert ("offload_optimizer" in ds["zero_optimization"]) == (zero == "offload")
    assert ds["optimizer"]["params"]["torch_adam"] == (zero != "offload")
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [math.isfinite(r["loss"]) for r in rows] == [True, False, True]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    _lrs_follow_the_schedule(rows, 2e-3, 2, json.loads((run_dir / "config.json").read_text())["total_steps"])
    # nothing of step 2 was applied: its engine state is step 1's, on both ranks' partitions
    ck = run_dir / "checkpoints"
    s1, s2, s3 = (engine_state(ck / f"step_{n:08d}") for n in (1, 2, 3))
    assert any("zero_pp_rank_1" in k for k in s1) and any("exp_avg" in k for k in s1)
    assert same(s1, s2), [k for k in s1 if k in s2 and not (torch.equal(s1[k], s2[k]) if
                                                               isinstance(s1[k], torch.Tensor) else s1[k] == s2[k])][:5]
    assert not same(s2, s3)  # and training went on after it
    final = records(run_dir)[-1]
    a, b = final["param_fingerprint_by_rank"]
    assert a == b and final["params_finite"] and final["nonfinite_steps"] == 1


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(one_rank):
    """1 rank, fp32, ZeRO-0 (a plain torch optimizer, guarded by dtp_ds itself); +inf at 3-5."""
    result = one_rank["stop"]
    assert result.rc == [2], result.stderr
    errors = [line for line in result.stderr[0].splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1 and "3 non-finite steps in a row (steps 3-5" in errors[0], result.stderr
    assert "--max-nonfinite-steps 3" in errors[0] and "last good checkpoint is step_00000004" in errors[0]
    assert "Traceback" not in result.stderr[0]
    run_dir = result.dir
    rows = steps(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["nonfinite_steps"] == 3
    assert rows[-1]["skipped_steps"] == 3
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
    # step 4 (saved during the run of non-finite steps) holds step 2's weights and optimizer state
    assert same(engine_state(ck / "step_00000002"), engine_state(ck / "step_00000004"))


def test_fp16_overflow_is_absorbed_by_the_dynamic_loss_scale(one_rank):
    """1 rank, fp16, ZeRO-0, initial loss scale 2^19: the first steps overflow (more of them in a
    row than --max-nonfinite-steps), the scale halves until the gradients fit, training goes on."""
    assert one_rank["fp16"].rc == [0], one_rank["fp16"].stderr
    run_dir = one_rank["fp16"].dir
    rows = steps(run_dir)
    assert all(math.isfinite(r["loss"]) for r in rows)
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped[2] == 3, skipped  # overflow, overflow, overflow: 3 in a row, beyond the limit of 2
    assert skipped[-1] < len(rows)  # then the scale fits and steps are applied
    flags = [b - a for a, b in zip([0, *skipped], skipped)]  # this step overflowed
    scales = [2.0**19] + [r["loss_scale"] for r in rows]  # the scale after each step
    assert all(b == (a / 2 if f else a) for a, b, f in zip(scales, scales[1:], flags)), (scales, flags)
    assert all(r["nonfinite_steps"] == 0 for r in rows)  # loss-scale overflows are not non-finite steps
    _lrs_follow_the_schedule(rows, 1e-3, 2, json.loads((run_dir / "config.json").read_text())["total_steps"])
    assert records(run_dir)[-1]["params_finite"]
