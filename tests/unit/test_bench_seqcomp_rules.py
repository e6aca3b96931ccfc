"""tools/bench_seqcomp's report on hand-made curves: the target over seeds, the sustained
rule within the baseline's measured budget, the overhead charged to the schedule, and the
table and figure that say so."""
from __future__ import annotations

import pytest

from dtp_ds.seqcomp.bench import Arm, markdown, plot, summarize


def points(*pairs):
    return [{"step": 10 * (i + 1), "time_s": float(t), "top1": float(a), "top5": 0.0} for i, (t, a) in enumerate(pairs)]


def arms():
    # baseline finals 20 and 22: target 21. Seed 0 ends below it (its time to target is its whole run,
    # 100 s); seed 1 stays at or above 21 from 80 s.
    base0 = Arm("baseline", "", curve=points((50, 15), (100, 20)), steps=20, train_time_s=100.0, seed=0)
    base1 = Arm("baseline", "", curve=points((40, 16), (80, 21), (100, 22)), steps=30, train_time_s=100.0, seed=1)
    # the schedule touches 21 at 20 s, dips, and stays from 60 s (seed 0) / 50 s (seed 1); its evaluation at
    # 120 s lies beyond the baseline's 100 s budget and does not count
    sched0 = Arm("schedule", "s.json", 0.5, curve=points((20, 23), (40, 15), (60, 21), (90, 24), (120, 10)),
                 steps=50, train_time_s=130.0, seed=0)
    sched1 = Arm("schedule", "s.json", 0.5, curve=points((20, 22), (35, 18), (50, 21.5), (95, 23)),
                 steps=40, train_time_s=95.0, seed=1)
    return [base0, base1, sched0, sched1]


def test_sustained_time_within_the_budget_and_the_overhead_counted():
    result = summarize(arms(), overhead_s=30.0)
    assert result["target_top1"] == pytest.approx(21.0)
    assert result["baseline_time_to_target_s_per_seed"] == {"0": 100.0, "1": 80.0}
    base, sched = result["rows"]
    assert base["per_seed"]["ratio"] == {"0": 1.0, "1": 1.0} and base["overhead_s"] == 0.0
    assert sched["per_seed"]["time_to_target_s"] == {"0": 60.0, "1": 50.0}
    assert sched["per_seed"]["time_to_target_first_s"] == {"0": 20.0, "1": 20.0}
    # (60 + 30) / 100 and (50 + 30) / 80
    assert sched["per_seed"]["ratio"] == pytest.approx({"0": 0.9, "1": 1.0})
    assert sched["per_seed"]["ratio_without_overhead"] == pytest.approx({"0": 0.6, "1": 0.625})
    assert sched["ratio"] == pytest.approx(0.95) and sched["ratio_without_overhead"] == pytest.approx(0.6125)
    assert sched["payback_baseline_s"] == pytest.approx(30.0 / (1 - 0.6125))
    # the evaluation past the budget is cut: final top-1 is the one at 90 s; seed 1 used 95 of 100 s
    assert sched["per_seed"]["final_top1"] == {"0": 24.0, "1": 23.0}
    assert sched["per_seed"]["budget_used"] == pytest.approx({"0": 1.0, "1": 0.95})
    # paired differences to the baseline (ratio - 1 on each seed: -0.1, 0.0) do not separate from 0
    assert sched["ratio_diff_mean"] == pytest.approx(-0.05) and sched["ratio_separated"] is False
    assert sched["reached"] == "2/2"


def test_an_arm_that_holds_only_past_the_budget_never_reaches():
    late = Arm("patch", "1:p=16", 0.5, curve=points((50, 10), (110, 30)), steps=20, train_time_s=110.0, seed=0)
    result = summarize([arms()[0], late])
    patch = result["rows"][1]
    assert patch["ratio"] is None and patch["reached"] == "0/1" and patch["best_top1"] == 10.0


def test_the_table_labels_the_rules_and_the_figure_is_written(tmp_path):
    result = summarize(arms(), overhead_s=30.0)
    table = markdown(result)
    assert "time to target s (sustained)" in table and "first touch s" in table
    assert "ratio (with overhead)" in table and "ratio w/o overhead" in table
    assert "| schedule | s.json |" not in table  # the schedule column is the SPEC text, not the file
    assert "0.95 +- " in table and "(2)" in table
    assert "schedule - baseline, ratio (with overhead): -0.05 [" in table and "not separated" in table
    assert "30.0 s of overhead counted" in table and "paid back at a baseline time to target of 77 s" in table
    plot(result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_the_accuracy_is_the_tasks_own_and_forward_passes_are_an_axis(tmp_path):
    """The arms are timed to the accuracy their evaluation rows log (kNN for an SSL task), each point
    carries the forward passes at its step, and the figure can plot against them."""
    import json

    from dtp_ds.seqcomp.bench import accuracy_key, curve

    assert accuracy_key([{"step": 1, "loss": 1.0}, {"step": 2, "zeroshot_top1": 5.0, "layout_top1": 3.0}]) == \
        "zeroshot_top1"
    assert accuracy_key([{"step": 2, "knn_top1": 9.0, "knn_top5": 20.0, "val_knn_top1": 1.0}]) == "knn_top1"
    assert accuracy_key([{"step": 2, "val_top1": 9.0}]) == "val_top1"
    with pytest.raises(SystemExit, match="no evaluation row"):
        accuracy_key([{"step": 1, "loss": 1.0}])
    rows = [{"step": s, "loss": 1.0, "step_time": 0.5, "forward_passes": 2 * 8 * s} for s in (1, 2, 3, 4)]
    rows += [{"step": 2, "knn_top1": 10.0, "knn_top5": 30.0}, {"step": 4, "knn_top1": 20.0, "knn_top5": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    points, total, key = curve(str(tmp_path))
    assert key == "knn_top1" and total == 2.0
    assert points == [{"step": 2, "time_s": 1.0, "top1": 10.0, "top5": 30.0, "forward_passes": 32},
                      {"step": 4, "time_s": 2.0, "top1": 20.0, "top5": 50.0, "forward_passes": 64}]
    base = Arm("baseline", "", curve=points, steps=4, train_time_s=total, seed=0)
    result = summarize([base])
    result["accuracy_key"] = key
    assert "the baseline's final kNN top-1" in markdown(result)
    plot(result, str(tmp_path / "bench.png"), "forward_passes")
    assert (tmp_path / "bench.png").stat().st_size > 0


def _fake_data(root):
    for d in ("train", "classify/train"):
        (root / d).mkdir(parents=True)
        for i in range(4):
            (root / d / f"{i:05d}.tar").write_bytes(b"")
    (root / "classify" / "val").mkdir()
    (root / "zeroshot").mkdir()
    return root


def _arm_command(tmp_path, *flags):
    import argparse

    from dtp_ds.seqcomp.bench import arm_flags
    from dtp_ds.seqcomp.demo import add_pipeline_args, parse_pipeline_args, run_command
    from dtp_ds.seqcomp.task_data import task_data

    data = _fake_data(tmp_path / "data")
    p = argparse.ArgumentParser()
    add_pipeline_args(p)
    a = parse_pipeline_args(p, ["--data", str(data), "--nproc", "2", "--batch-size", "8", *flags])
    a.logs, a.steps, a.eval_every, a.budget_margin, a.warmup_fraction = str(tmp_path / "logs"), 40, 10, 1.15, 0.05
    arm = Arm("dropout", "1:r=0.5", 0.6)
    cmd = run_command(a, "bench-dropout-s0", [*arm_flags(a, arm, "costs.json"), *a.task_flags],
                      task_data(a.task, a.data, a.knn_bank_max_images).flags())
    return cmd, data, arm


def test_an_ssl_arms_command_trains_the_task_on_the_class_split_evaluated_by_knn(tmp_path):
    """``--task mocov3``: every arm's dtp_ds.train command names the task, trains on the class-labelled
    shards, evaluates kNN (--val-data, a --knn-bank of the training shards) instead of zero-shot,
    passes the task's own flags through, and is a command dtp_ds.train accepts."""
    from dtp_ds.train.args import parse_args

    cmd, data, arm = _arm_command(tmp_path, "--task", "mocov3", "--moco-mlp-dim", "64",
                                  "--knn-bank-max-images", "200")
    train = cmd[cmd.index("dtp_ds.train") + 1:]
    pattern = f"{data}/classify/train/{{00000..00003}}.tar"
    assert train.count("--train-data") == 1 and train[train.index("--train-data") + 1] == pattern
    assert not any(f.startswith("--zeroshot") for f in train)
    assert train[train.index("--val-data") + 1] == f"{data}/classify/val"
    assert train[train.index("--knn-bank") + 1] == pattern
    # 40 steps at cost 0.6, 15% margin: 77 steps, planned in epochs of 10
    assert arm.steps == 80 and train[train.index("--epochs") + 1] == "8"
    assert train[train.index("--seqcomp-schedule") + 1] == "1:r=0.5"
    args = parse_args(train)
    assert args.model.task == "mocov3" and args.data.train_data == pattern
    cfg = args.task_config
    assert cfg.moco_mlp_dim == 64 and cfg.knn_bank == pattern and cfg.knn_bank_max_images == 200
    assert cfg.val_data == [f"{data}/classify/val"]


def test_a_clip_arms_command_keeps_the_zero_shot_data_and_another_tasks_flag_is_refused(tmp_path):
    from dtp_ds.train.args import parse_args

    cmd, data, _ = _arm_command(tmp_path)
    train = cmd[cmd.index("dtp_ds.train") + 1:]
    assert train[train.index("--task") + 1] == "clip"
    assert train[train.index("--train-data") + 1] == f"{data}/train/{{00000..00003}}.tar"
    assert train[train.index("--zeroshot-data") + 1] == f"{data}/zeroshot" and "--knn-bank" not in train
    assert parse_args(train).task_config.zeroshot_data == f"{data}/zeroshot"
    with pytest.raises(SystemExit):
        _arm_command(tmp_path / "other", "--moco-mlp-dim", "64")
