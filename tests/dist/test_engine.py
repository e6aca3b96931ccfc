"""Real multi-rank training under the deepspeed launcher on CPU (gloo): every ZeRO stage
and every precision, activation checkpointing, resume, and refused configurations."""
from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import base_args, metrics, run_train, step_records

pytestmark = pytest.mark.dist


# bf16 is emulated on CPUs without it (a matmul ~46x slower): the GradCache case, two chunks of
# checkpointed forwards per step, runs fp32 so that the launch fits its time limit
@pytest.mark.parametrize("stage,precision,ckpt,extra", [
    (0, "bf16", False, []),
    (1, "fp32", True, ["--accum-freq", "2", "--local-loss", "--gather-with-grad"]),
    (2, "fp16", False, []),
    (3, "bf16", True, ["zero3-partitioned-eval"]),
])
def test_trains_under_every_stage_and_precision(synth, tmp_path, stage, precision, ckpt, extra):
    args = base_args(synth, tmp_path, "run", "--zero-stage", str(stage), "--precision", precision,
                     "--max-steps", "12", "--lr", "2e-3", "--grad-checkpointing" if ckpt else "--no-grad-checkpointing")
    if extra == ["zero3-partitioned-eval"]:
        # Partition every parameter (the tiny model's all sit below the default persistence
        # threshold, a real model's do not) and evaluate zero-shot at the end: the eval runs
        # outside the engine's forward and must still see CLIP's own parameters.
        cfg = json.loads(open(args[args.index("--deepspeed_config") + 1]).read())
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
        (tmp_path / "ds.json").write_text(json.dumps(cfg))
        args[args.index("--deepspeed_config") + 1] = str(tmp_path / "ds.json")
        extra = ["--zeroshot-data", str(synth / "zeroshot"), "--zeroshot-frequency", "1"]
    # this CPU lacks native fp16: run DeepSpeed's real fp16 engine on emulated kernels
    run_train(args + extra, env={"DTP_DS_ALLOW_EMULATED_FP16": "1"})
    run = tmp_path / "run"
    steps = step_records(run)
    assert [r["step"] for r in steps] == list(range(1, 13))
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(v) for v in losses)
    # a grad norm for every step; not finite only where fp16's loss scale skipped the step
    applied = [r for r, skipped_before in zip(steps, [0] + [r["skipped_steps"] for r in steps])
               if r["skipped_steps"] == skipped_before]
    assert all(r["grad_norm"] is not None for r in steps) and len(applied) >= 6
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in applied), [r["grad_norm"] for r in steps]
    # the loss falls: the last steps sit well below the first ones
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    final = metrics(run)[-1]
    assert final["final"] and final["params_finite"]
    a, b = final["param_fingerprint_by_rank"]
    assert a == b, f"ranks disagree: {a} vs {b}"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ds_config"]["zero_optimization"]["stage"] == stage
    assert cfg["args"]["model"]["grad_checkpointing"] is ckpt
    if precision == "fp16":
        assert all("loss_scale" in r for r in steps)
    if "--accum-freq" in extra:  # 12 optimizer steps of one GradCache batch of 2 micro-batches each
        assert cfg["ds_config"]["gradient_accumulation_steps"] == 2
        assert final["samples_seen"] == 12 * 2 * 16 * 2
    if "--zeroshot-data" in extra:
        evals = [r for r in metrics(run) if "zeroshot_top1" in r]
        assert len(evals) == 1 and evals[0]["zeroshot_images"] == 96
    assert (run / "loss.png").stat().st_size > 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000012"


def _curve(run_dir):
    return [(r["step"], r["lr"], r["loss"]) for r in step_records(run_dir)]


def open_clip_vit_file(path) -> str:
    """An open_clip ViT-Tiny-8's weights (what --init-from maps into the dtp_ds trunk)."""
    import open_clip
    import torch

    import dtp_ds  # noqa: F401

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-Tiny-8").state_dict(), path)
    return str(path)


@pytest.mark.parametrize("nproc,precision,stage,warm", [(1, "fp32", 0, False), (2, "bf16", 2, True)])
def test_resume_continues_lr_and_loss_curves(synth, tmp_path, nproc, precision, stage, warm):
    """N steps, stop, --resume latest to 2N == a straight 2N run (exact in fp32 on one rank).

    Two dataloader workers and an odd stop step exercise the resume's worker rotation. ``warm``:
    every run is the dtp_ds trunk with --init-from an open_clip ViT; the table is written at the
    first start, and the resume does not apply it again (the checkpoint's weights win)."""
    common = ["--precision", precision, "--zero-stage", str(stage), "--workers", "2", "--lr", "2e-3"]
    if warm:
        common += ["--model", "Plain-ViT-Tiny-8", "--init-from", open_clip_vit_file(tmp_path / "vit.pt")]
    run_train(base_args(synth, tmp_path, "straight", *common, "--max-steps", "6"), nproc=nproc)
    run_train(base_args(synth, tmp_path, "split", *common, "--max-steps", "3"), nproc=nproc)
    run_train(base_args(synth, tmp_path, "split", *common, "--max-steps", "6", "--resume", "latest"), nproc=nproc)
    straight, split = _curve(tmp_path / "straight"), _curve(tmp_path / "split")
    assert [s for s, _, _ in split] == [1, 2, 3, 4, 5, 6]  # records past the checkpoint are not duplicated
    assert [lr for _, lr, _ in split] == [lr for _, lr, _ in straight]
    if nproc == 1 and precision == "fp32":
        assert split == straight
    else:
        for (_, _, a), (_, _, b) in zip(split, straight):
            assert abs(a - b) < 2e-2 * max(1.0, abs(b))
    cfg = json.loads((tmp_path / "split" / "config.json").read_text())
    assert cfg["resumed_from"].endswith("step_00000003")
    final = metrics(tmp_path / "split")[-1]
    assert final["samples_seen"] == metrics(tmp_path / "straight")[-1]["samples_seen"]
    if warm:
        first = json.loads((tmp_path / "straight" / "config.json").read_text())["init_from"]
        assert first["applied"] and set(first["counts"]) == {"loaded", "mapped"}, first  # text as is, image mapped
        table = (tmp_path / "split" / "init_from.txt").read_text()  # the first start's, kept
        assert re.search(r"^visual\.trunk\.head\.weight +visual\.proj +mapped$", table, re.M), table
        assert not cfg["init_from"]["applied"] and "step_00000003" in cfg["init_from"]["note"]


def test_zeroshot_eval_and_wandb_offline(synth, tmp_path):
    """Two epochs of two steps, evaluated after each (the step timer's restart after them is
    tests/unit/test_train_components.py's)."""
    run_train(base_args(synth, tmp_path, "zs", "--epochs", "2", "--train-num-samples", "64", "--zeroshot-data",
                        str(synth / "zeroshot"), "--zeroshot-frequency", "1", "--report-to", "wandb"),
              env={"WANDB_MODE": "offline", "WANDB_API_KEY": "secret-key-must-not-leak"})
    run = tmp_path / "zs"
    evals = [r for r in metrics(run) if "zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["zeroshot_images"] == 96 and evals[0]["zeroshot_classes"] == 48
    first_of_epoch = next(r for r in step_records(run) if r["step"] == 3)
    assert first_of_epoch["epoch"] == 1
    assert 0 <= evals[0]["zeroshot_top1"] <= evals[0]["zeroshot_top5"] <= 100
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert "secret-key-must-not-leak" not in (run / "config.json").read_text()


@pytest.mark.parametrize("case", ["unknown_model", "batch_mismatch", "no_shards", "too_few_shards",
                                  "most_shards_missing"])
def test_bad_config_fails_clearly_and_writes_nothing(synth, tmp_path, case):
    logs = tmp_path / "logs"
    args = base_args(synth, logs, "bad", "--max-steps", "1")
    expect = {"unknown_model": "unknown model 'ViT-Nope-99'",
              "batch_mismatch": "batch sizes do not multiply out",
              "no_shards": "no shard matches --train-data",
              "too_few_shards": "12 shards for 2 ranks x 8 workers: every worker needs a shard",
              "most_shards_missing": "18 of 30 shards named by --train-data do not exist"}[case]
    if case == "unknown_model":
        args[args.index("--model") + 1] = "ViT-Nope-99"
    elif case == "batch_mismatch":
        bad = tmp_path / "bad_ds.json"
        bad.write_text(json.dumps({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 16,
                                   "gradient_accumulation_steps": 1}))
        args[args.index("--deepspeed_config") + 1] = str(bad)
        del args[args.index("--batch-size"):args.index("--batch-size") + 2]
    elif case == "no_shards":
        args[args.index("--train-data") + 1] = str(synth / "train" / "{90000..90009}.tar")
    elif case == "most_shards_missing":
        args[args.index("--train-data") + 1] = str(synth / "train" / "{00000..00029}.tar")
    else:
        args[args.index("--workers") + 1] = "8"
    proc = run_train(args, nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not logs.exists(), "a refused run must write nothing"
