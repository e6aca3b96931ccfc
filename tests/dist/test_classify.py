"""``--task classify`` for real: 2 ranks under the deepspeed launcher on CPU train a DRIP
classifier (its boundaries chosen by threshold, so its rate loss is live) on the synthetic
class-labelled split under ZeRO-3 with every parameter partitioned, evaluate on the validation
split as class folders and as a cls shard each epoch, and export the classifier. Crops, random
erasing and mixup on; ten times chance on the 56 "colour on background" classes needs both."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dtp_ds.models import CONFIG_DIR
from tests.conftest import TINY_DS_CONFIG, metrics, run_train, step_records

pytestmark = pytest.mark.dist


def test_drip_classifier_trains_to_10x_chance_under_zero3(synth_cls, tmp_path):
    cfg = json.loads((CONFIG_DIR / "DRIP-ViT-Tiny-8-4x.json").read_text())
    cfg["vision_cfg"]["reducer_cfg"].update(selection="threshold")  # (top-k fixes the count: no rate loss)
    model = tmp_path / "DRIP-Threshold-ViT-Tiny-8-4x.json"
    model.write_text(json.dumps(cfg))
    ds = json.loads(open(TINY_DS_CONFIG).read())
    # partition every parameter (the tiny model's all sit below the default persistence threshold)
    ds["zero_optimization"].update(stage=3, stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    data = synth_cls / "classify"
    run_train(["--task", "classify", "--deepspeed_config", str(tmp_path / "ds.json"), "--model", str(model),
               "--train-data", f"{data}/train/{{00000..00011}}.tar",
               "--val-data", str(data / "val"), str(data / "val_shards" / "00000.tar"),
               "--logs", str(tmp_path), "--name", "cls", "--precision", "fp32", "--batch-size", "32",
               "--workers", "1", "--epochs", "2", "--train-num-samples", "1536", "--lr", "2e-3", "--warmup", "5",
               "--scale", "0.5", "1", "--color-jitter", "0", "--reprob", "0.25", "--mixup", "0.2",
               "--mixup-prob", "0.5", "--drop-path", "0.05", "--log-every-n-steps", "4", "--seed", "0"])
    run = tmp_path / "cls"
    conf = json.loads((run / "config.json").read_text())
    assert conf["args"]["task_config"]["num_classes"] == 56  # from the class folders of --val-data
    assert conf["ds_config"]["zero_optimization"]["stage"] == 3
    steps = step_records(run)
    assert steps[-1]["step"] == 48  # 2 epochs of 1,536 samples at 2 x 32
    assert all(math.isfinite(r["loss"]) and r["boundary_loss"] > 0 for r in steps)  # the ratio loss, live
    assert all(r["loss"] == pytest.approx(r["ce_loss"] + r["boundary_loss"], rel=1e-5) for r in steps)
    evals = [r for r in metrics(run) if "val_top1" in r]
    assert [r["step"] for r in evals] == [24, 48]  # every epoch; the last is the final one
    last = evals[-1]
    assert last["val_images"] == last["val_shards_images"] == 448 and last["val_classes"] == 56
    # the same images as class folders and as a cls shard: the same answers
    assert (last["val_top1"], last["val_top5"]) == (last["val_shards_top1"], last["val_shards_top5"])
    assert last["val_top1"] >= 10 * last["val_chance_top1"], evals
    assert 1.5 < last["val_compression"] < 8  # DRIP pooled at about its 4x in evaluation
    final = metrics(run)[-1]
    a, b = final["param_fingerprint_by_rank"]
    assert final["params_finite"] and a == b

    # the ZeRO-3 checkpoint exports to a classifier that gives the run's own answers
    from dtp_ds.eval.classify import class_split, classify_eval
    from dtp_ds.tasks.classify import ClassifyConfig, transforms
    from dtp_ds.train.export import export_safetensors, load_exported

    export_safetensors(str(run), str(tmp_path / "cls.safetensors"))
    clf = load_exported(str(tmp_path / "cls.safetensors"))
    res = classify_eval(clf, transforms(clf, ClassifyConfig())[1], class_split(str(data / "val")),
                        torch.device("cpu"), workers=0)
    assert res["val_top1"] == pytest.approx(last["val_top1"], abs=0.5)  # at most 2 of 448 near-ties differ
