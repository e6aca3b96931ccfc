"""Real multi-rank training under the deepspeed launcher on CPU (gloo): every ZeRO stage
and every precision, activation checkpointing, resume, zero-shot evaluation with wandb offline,
and refused configurations. The two-rank runs share one launch and the one-rank resume runs
another (tests/dist/train_runs.py): each run is the entry point's own body."""
from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import TINY_DS_CONFIG, base_args, metrics, run_many, step_records

pytestmark = pytest.mark.dist


# bf16 is emulated on CPUs without it (a matmul ~46x slower): the GradCache case, two chunks of
# checkpointed forwards per step, runs fp32 so that the launch fits its time limit
STAGES = {
    "stage0": (0, "bf16", False, []),
    "stage1": (1, "fp32", True, ["--accum-freq", "2", "--local-loss", "--gather-with-grad"]),
    "stage2": (2, "fp16", False, []),
    "stage3": (3, "bf16", True, ["zero3-partitioned-eval"]),
}
BAD = {"unknown_model": "unknown model 'ViT-Nope-99'",
       "batch_mismatch": "batch sizes do not multiply out",
       "no_shards": "no shard matches --train-data",
       "too_few_shards": "12 shards for 2 ranks x 8 workers: every worker needs a shard",
       "most_shards_missing": "18 of 30 shards named by --train-data do not exist"}
SECRET = "secret-key-must-not-leak"


def open_clip_vit_file(path) -> str:
    """An open_clip ViT-Tiny-8's weights (what --init-from maps into the dtp_ds trunk)."""
    import open_clip
    import torch

    import dtp_ds  # noqa: F401

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-Tiny-8").state_dict(), path)
    return str(path)


def stage_args(synth, logs, name, stage, precision, ckpt, extra) -> list[str]:
    args = base_args(synth, logs, name, "--zero-stage", str(stage), "--precision", precision,
                     "--max-steps", "12", "--lr", "2e-3", "--grad-checkpointing" if ckpt else "--no-grad-checkpointing")
    if extra == ["zero3-partitioned-eval"]:
        # Partition every parameter (the tiny model's all sit below the default persistence
        # threshold, a real model's do not) and evaluate zero-shot at the end: the eval runs
        # outside the engine's forward and must still see CLIP's own parameters.
        cfg = json.loads(open(TINY_DS_CONFIG).read())
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
        (logs / "ds3.json").write_text(json.dumps(cfg))
        args[args.index("--deepspeed_config") + 1] = str(logs / "ds3.json")
        extra = ["--zeroshot-data", str(synth / "zeroshot"), "--eval-frequency", "1"]
    return args + extra


def bad_args(synth, logs, case) -> list[str]:
    args = base_args(synth, logs / case, "bad", "--max-steps", "1")
    if case == "unknown_model":
        args[args.index("--model") + 1] = "ViT-Nope-99"
    elif case == "batch_mismatch":
        bad = logs / "bad_ds.json"
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
    return args


def resume_runs(synth, logs, precision, stage, warm) -> dict[str, list[str]]:
    """N steps, stop, --resume latest to 2N, and a straight 2N run. Two dataloader workers and an
    odd stop step exercise the resume's worker rotation. ``warm``: the dtp_ds trunk with
    --init-from an open_clip ViT (the table is written at the first start only)."""
    common = ["--precision", precision, "--zero-stage", str(stage), "--workers", "2", "--lr", "2e-3"]
    if warm:
        common += ["--model", "PatchStem-ViT-Tiny-8", "--init-from", open_clip_vit_file(logs / "vit.pt")]
    return {"straight": base_args(synth, logs, "straight", *common, "--max-steps", "6"),
            "split": base_args(synth, logs, "split", *common, "--max-steps", "3"),
            "resumed": base_args(synth, logs, "split", *common, "--max-steps", "6", "--resume", "latest")}


@pytest.fixture(scope="module")
def two_ranks(synth, tmp_path_factory):
    """Every two-rank run of this module, in one launch."""
    logs = tmp_path_factory.mktemp("engine2")
    runs = {name: stage_args(synth, logs, name, *case) for name, case in STAGES.items()}
    (logs / "warm").mkdir()
    runs.update({f"warm-{k}": v for k, v in resume_runs(synth, logs / "warm", "bf16", 2, True).items()})
    runs["zs"] = base_args(synth, logs, "zs", "--epochs", "2", "--train-num-samples", "64", "--zeroshot-data",
                           str(synth / "zeroshot"), "--eval-frequency", "1", "--report-to", "wandb")
    runs.update({f"bad-{case}": bad_args(synth, logs, case) for case in BAD})
    return run_many(runs, logs / "launch", env={"DTP_DS_ALLOW_EMULATED_FP16": "1"},
                    run_env={"zs": {"WANDB_MODE": "offline", "WANDB_API_KEY": SECRET}})


@pytest.fixture(scope="module")
def one_rank(synth, tmp_path_factory):
    logs = tmp_path_factory.mktemp("engine1")
    return run_many(resume_runs(synth, logs, "fp32", 0, False), logs / "launch", nproc=1)


@pytest.mark.parametrize("name", list(STAGES))
def test_trains_under_every_stage_and_precision(two_ranks, name):
    stage, precision, ckpt, extra = STAGES[name]
    result = two_ranks[name]
    assert result.rc == [0, 0], result.stderr
    run = result.dir
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
    if extra == ["zero3-partitioned-eval"]:
        evals = [r for r in metrics(run) if "zeroshot_top1" in r]
        assert len(evals) == 1 and evals[0]["zeroshot_images"] == 96
    assert (run / "loss.png").stat().st_size > 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000012"


def _curve(run_dir):
    return [(r["step"], r["lr"], r["loss"]) for r in step_records(run_dir)]


@pytest.mark.parametrize("ranks,warm", [("one", False), ("two", True)])
def test_resume_continues_lr_and_loss_curves(one_rank, two_ranks, ranks, warm):
    """N steps, stop, --resume latest to 2N == a straight 2N run (exact in fp32 on one rank).
    Warm: every run is the dtp_ds trunk with --init-from an open_clip ViT; the table is written
    at the first start, and the resume does not apply it again (the checkpoint's weights win)."""
    runs = one_rank if ranks == "one" else {k[len("warm-"):]: v for k, v in two_ranks.items() if k.startswith("warm-")}
    assert all(r.rc == [0] * len(r.rc) for r in runs.values()), {k: r.stderr for k, r in runs.items()}
    straight, split = runs["straight"].dir, runs["resumed"].dir
    a, b = _curve(split), _curve(straight)
    assert [s for s, _, _ in a] == [1, 2, 3, 4, 5, 6]  # records past the checkpoint are not duplicated
    assert [lr for _, lr, _ in a] == [lr for _, lr, _ in b]
    if ranks == "one":
        assert a == b
    else:
        for (_, _, x), (_, _, y) in zip(a, b):
            assert abs(x - y) < 2e-2 * max(1.0, abs(y))
    cfg = json.loads((split / "config.json").read_text())
    assert cfg["resumed_from"].endswith("step_00000003")
    assert metrics(split)[-1]["samples_seen"] == metrics(straight)[-1]["samples_seen"]
    if warm:
        first = json.loads((straight / "config.json").read_text())["init_from"]
        assert first["applied"] and set(first["counts"]) == {"loaded", "mapped"}, first  # text as is, image mapped
        table = (split / "init_from.txt").read_text()  # the first start's, kept
        assert re.search(r"^visual\.trunk\.head\.weight +visual\.proj +mapped$", table, re.M), table
        assert not cfg["init_from"]["applied"] and "step_00000003" in cfg["init_from"]["note"]


def test_zeroshot_eval_and_wandb_offline(two_ranks):
    """Two epochs of two steps, evaluated after each (the step timer's restart after them is
    tests/unit/test_train_components.py's)."""
    assert two_ranks["zs"].rc == [0, 0], two_ranks["zs"].stderr
    run = two_ranks["zs"].dir
    evals = [r for r in metrics(run) if "zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["zeroshot_images"] == 96 and evals[0]["zeroshot_classes"] == 48
    first_of_epoch = next(r for r in step_records(run) if r["step"] == 3)
    assert first_of_epoch["epoch"] == 1
    assert 0 <= evals[0]["zeroshot_top1"] <= evals[0]["zeroshot_top5"] <= 100
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    assert SECRET not in (run / "config.json").read_text()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_clearly_and_writes_nothing(two_ranks, case):
    """Refused on every rank with exit status 2; one line on rank 0's stderr, none on rank 1's,
    no traceback; nothing written. (The command line's own exit through the launcher:
    tests/faults/test_bad_data.py.)"""
    result = two_ranks[f"bad-{case}"]
    assert result.rc == [2, 2], result.stderr
    errors = [line for line in result.stderr[0].splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1 and BAD[case] in errors[0], result.stderr
    assert "dtp_ds.train: error:" not in result.stderr[1]
    assert not any("Traceback" in err for err in result.stderr)
    assert not result.dir.parent.exists(), "a refused run must write nothing"
