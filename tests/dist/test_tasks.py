"""Tasks for real, in one launch of 2 ranks on CPU (tests/conftest.py ``run_many``):

- a task is one file: this file's rotation task (RotNet: which quarter-turn was an image given?)
  trains through ``--task tests/dist/test_tasks.py`` with no edit to dtp_ds: its own settings
  (``--rotations``), data stage, class-folder training data, checkpoint state and export; a CLIP
  flag on it is refused by name; ``--task classify --accum-freq 2`` accumulates two micro-batches
  the plain way (its loss does not couple the batch);
- the augmentation-invariance tasks: MoCo v3 under ZeRO-2 (DRIP's trunk, its boundary loss live)
  and ZeRO-3 (every parameter partitioned, the momentum encoder's EMA on the partitions), SimCLR
  under ZeRO-3, DINO with two local crops (multi-crop: positions resampled to their grid) under
  ZeRO-2, each kNN-evaluated against a bank of training images; MoCo v3 stopped at step 3 and
  resumed to 6 equals the straight 6-step run (weights, losses, momentum schedule);
- tools/evaluate --knn and tools/linear_probe read an SSL run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from dtp_ds.models import record_forward, vision_tower
from dtp_ds.tasks import TaskBase, TaskSpec, reducer_terms, register_task
from tests.conftest import TINY_DS_CONFIG, metrics, run_many, step_records

pytestmark = [pytest.mark.dist, pytest.mark.timeout(1500)]  # the launch: nine runs, about two launches long
THIS = Path(__file__).resolve()
SSL_STEPS = 12  # each SSL run's steps of 2 x 16 (the pretext loss falls within them: first 5 vs last 5)


@dataclass
class RotationConfig:
    rotations: int = 4  # quarter-turns to tell apart (2: upright or upside down)


class RotationStage:
    keys = ()  # the image alone: labels are made here

    def __init__(self, size: int, rotations: int) -> None:
        self.rotations = rotations
        self.preprocess = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                              transforms.ToTensor()])

    def __call__(self, image: Any, sample: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(torch.randint(self.rotations, ()))  # the loader seeds torch per sample
        turns = k * (4 // self.rotations)
        return torch.rot90(self.preprocess(image), turns, dims=(1, 2)), torch.tensor(k)


class RotationModule(nn.Module):
    def __init__(self, model: nn.Module, aux_loss_weight: float) -> None:
        super().__init__()
        self.model, self.aux_loss_weight = model, aux_loss_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with record_forward() as records:
            logits = self.model(batch["image"]).float()
        ce = F.cross_entropy(logits, batch["rotation"])
        aux, row = reducer_terms(records, self.aux_loss_weight)
        return {"loss": ce if aux is None else ce + aux, "rotation_ce": ce, **row}


@register_task("rotation")
class RotationTask(TaskBase):
    """--task rotation: predict an image's quarter-turn (a test's own task)."""

    Config = RotationConfig
    train_layouts: ClassVar[frozenset[str]] = frozenset({"shards", "folder"})
    couples_batch = False
    batch_keys = ("image", "rotation")

    @classmethod
    def add_flags(cls, add) -> None:
        add("--rotations", type=int, help="quarter-turns told apart: 2 or 4")

    @classmethod
    def check(cls, cfg: RotationConfig) -> None:
        if cfg.rotations not in (2, 4):
            raise ValueError(f"--rotations {cfg.rotations}: 2 or 4")

    @classmethod
    def build_model(cls, model: str, client_state: dict[str, Any]) -> nn.Module:
        return vision_tower(model, int(client_state["rotations"]))

    def __init__(self, spec: TaskSpec) -> None:
        self.cfg: RotationConfig = spec.config
        self.model = self.build_model(spec.model, self.client_state())
        self.module = RotationModule(self.model, spec.aux_loss_weight)
        self.size = int(self.model.img_size[0])

    def data_stage(self) -> RotationStage:
        return RotationStage(self.size, self.cfg.rotations)

    def client_state(self) -> dict[str, Any]:
        return {"rotations": self.cfg.rotations}


def ds_zero3(tmp_path: Path) -> str:
    ds = json.loads(open(TINY_DS_CONFIG).read())
    ds["zero_optimization"].update(stage=3, stage3_param_persistence_threshold=0, stage3_max_live_parameters=0)
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def launch(synth_cls, tmp_path_factory):
    """Every run of this file in one launch: (results by name, the class split, its training shards, tmp)."""
    tmp_path = tmp_path_factory.mktemp("tasks")
    data = synth_cls / "classify"
    train = f"{data}/train/{{00000..00011}}.tar"
    z3 = ds_zero3(tmp_path)
    seam = ["--deepspeed_config", TINY_DS_CONFIG, "--model", "DRIP-ViT-Tiny-8-4x", "--logs", str(tmp_path),
            "--batch-size", "8", "--workers", "1", "--warmup", "1", "--log-every-n-steps", "1",
            "--precision", "fp32", "--train-num-samples", "64", "--seed", "0"]
    common = ["--train-data", train, "--logs", str(tmp_path), "--batch-size", "16", "--workers", "1",
              "--warmup", "2", "--log-every-n-steps", "1", "--precision", "fp32", "--lr", "1e-3", "--seed", "0",
              "--deepspeed_config", TINY_DS_CONFIG]
    knn = ["--val-data", str(data / "val"), "--knn-bank", train, "--knn-bank-max-images", "448",
           "--eval-max-images", "112"]
    small = ["--train-num-samples", str(SSL_STEPS * 32)]
    resume = ["--task", "mocov3", "--model", "ViT-Tiny-8", *common, "--deepspeed_config", z3,
              "--train-num-samples", "192", "--moco-mlp-dim", "64", "--moco-dim", "32", "--eval-frequency", "0"]
    runs = {
        # class folders as training data, ZeRO-2, two micro-batches accumulated per step
        "rotation": ["--task", str(THIS), "--rotations", "2", "--train-data", str(data / "val"), "--name", "rotation",
                     "--zero-stage", "2", "--accum-freq", "2", *seam],
        "classify": ["--task", "classify", "--train-data", train, "--num-classes", "56", "--name", "classify",
                     "--zero-stage", "1", "--accum-freq", "2", "--eval-frequency", "0", *seam],
        "refused": ["--task", str(THIS), "--local-loss", "--train-data", str(data / "val"), "--name", "refused",
                    *seam],
        "mocov3": ["--task", "mocov3", "--model", "DRIP-ViT-Tiny-8-4x", *common, *small, *knn, "--zero-stage", "2",
                   "--moco-mlp-dim", "256", "--moco-dim", "64", "--name", "mocov3"],
        "simclr": ["--task", "simclr", "--model", "ViT-Tiny-8", *common, *small, *knn, "--deepspeed_config", z3,
                   "--simclr-mlp-dim", "256", "--simclr-dim", "64", "--name", "simclr"],
        "dino": ["--task", "dino", "--model", "ViT-Tiny-8", *common, *small, *knn, "--zero-stage", "2",
                 "--dino-local-crops", "2", "--dino-out-dim", "256", "--name", "dino"],
        "straight": [*resume, "--name", "straight"],
        "split": [*resume, "--name", "split", "--max-steps", "3"],
        "resumed": [*resume, "--name", "split", "--resume", "latest"],
    }
    return run_many(runs, tmp_path / "launch", timeout=1500), data, train, tmp_path


def test_a_task_in_its_own_file_trains_and_exports(launch):
    res = launch[0]
    for name in ("rotation", "classify"):
        assert res[name].rc == [0, 0], res[name].stderr
        conf = json.loads((res[name].dir / "config.json").read_text())
        # 64 samples, 2 ranks x 8 x 2 accumulated micro-batches: 2 steps of 32
        assert conf["ds_config"]["gradient_accumulation_steps"] == 2 and conf["ds_config"]["train_batch_size"] == 32
        assert [r["step"] for r in step_records(res[name].dir)] == [1, 2]
    conf = json.loads((res["rotation"].dir / "config.json").read_text())
    assert conf["args"]["model"]["task"] == "rotation" and conf["args"]["task_config"] == {"rotations": 2}
    rows = step_records(res["rotation"].dir)
    assert all("rotation_ce" in r and "boundary_loss" in r for r in rows)  # the task's row, DRIP's terms
    assert metrics(res["rotation"].dir)[-1]["params_finite"]
    assert res["refused"].rc == [2, 2]
    assert "--local-loss (--task clip): not flags of --task rotation" in res["refused"].stderr[0]

    # the export rebuilds the model from what the task recorded (2 rotation classes)
    from dtp_ds.train.export import load_model_from_checkpoint

    model, name = load_model_from_checkpoint(str(res["rotation"].dir))
    assert name == "DRIP-ViT-Tiny-8-4x" and model.num_classes == 2
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)


def test_ssl_tasks_train_evaluate_and_resume(launch):
    res, data, train, tmp_path = launch
    for name in ("mocov3", "simclr", "dino", "straight", "split", "resumed"):
        assert res[name].rc == [0, 0], (name, res[name].stderr)

    for name, loss_key, views in (("mocov3", "contrastive_loss", 2), ("simclr", "contrastive_loss", 2),
                                  ("dino", "dino_loss", 4)):
        run = res[name].dir
        rows = step_records(run)
        assert [r["step"] for r in rows] == list(range(1, SSL_STEPS + 1)), name
        assert all(math.isfinite(r["loss"]) for r in rows)
        first, last = (sum(r[loss_key] for r in part) / 5 for part in (rows[:5], rows[-5:]))
        # the pretext loss falls (not DINO's: its teacher temperature warms up over these steps,
        # raising the targets' entropy and so the cross-entropy, as in the paper's first epochs)
        assert last < first or name == "dino", (name, first, last)
        assert rows[-1]["forward_passes"] == SSL_STEPS * 32 * views  # samples seen x views per sample
        evals = [r for r in metrics(run) if "knn_top1" in r]
        assert [r["step"] for r in evals] == [SSL_STEPS], name
        e = evals[-1]
        assert e["knn_images"] == 112 and e["knn_bank"] == 448 and e["knn_classes"] == 56
        assert e["knn_top1"] >= 3 * e["knn_chance_top1"], (name, e)
        conf = json.loads((run / "config.json").read_text())
        assert conf["args"]["model"]["task"] == name
    mocov3 = step_records(res["mocov3"].dir)
    assert all(r["boundary_loss"] >= 0 and "compression" in r for r in mocov3)  # DRIP's terms reach the row
    assert mocov3[0]["momentum"] == pytest.approx(0.99) and 0.99 < mocov3[-1]["momentum"] <= 1.0
    dino = step_records(res["dino"].dir)
    assert dino[0]["teacher_temp"] == pytest.approx(0.04) and dino[-1]["teacher_temp"] == pytest.approx(0.07)
    # the run's one epoch is DINO's frozen-last-layer epoch; its weight decay rises from the ds_config's
    assert all(r["last_layer_frozen"] == 1.0 for r in dino)
    assert dino[0]["weight_decay"] == pytest.approx(0.1) and 0.39 < dino[-1]["weight_decay"] < 0.4
    mocov3_config = json.loads((res["mocov3"].dir / "config.json").read_text())["args"]["task_config"]
    assert mocov3_config["moco_freeze_patch_embed"] is True  # the random patch projection, recorded

    # stop at 3, resume to 6 == straight to 6 (ZeRO-3, the momentum encoder's schedule restored)
    straight, split = step_records(res["straight"].dir), step_records(res["split"].dir)
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r["momentum"] for r in split] == [r["momentum"] for r in straight]
    assert metrics(res["split"].dir)[-1]["param_fingerprint_by_rank"] == \
        metrics(res["straight"].dir)[-1]["param_fingerprint_by_rank"]

    # the seqcomp estimator (tools/seqcomp_schedule) reads an SSL run's checkpoint whole: the
    # model, the heads and the momentum encoder, under ZeRO-2 (DRIP) and ZeRO-3
    from dtp_ds.seqcomp.camse import load_stage
    from dtp_ds.train.export import module_fp32_state, resolve_checkpoint_dir

    for name, steps in (("mocov3", SSL_STEPS), ("straight", 6)):
        built, _, step = load_stage(str(res[name].dir), "mocov3")
        saved = module_fp32_state(resolve_checkpoint_dir(str(res[name].dir)), built.model)
        loaded = built.module.state_dict()
        assert step == steps and set(loaded) <= set(saved), (name, sorted(set(loaded) - set(saved))[:5])
        for key in ("predictor.0.weight", "projector.0.weight", "teacher.projector.0.weight", "model.cls_token"):
            assert torch.equal(loaded[key], saved[key]), (name, key)

    # tools/evaluate --knn on the finished run (one process) reproduces its last kNN row (the
    # ranks gathered the features in order); tools/linear_probe reads the same run
    from dtp_ds.cli import evaluate, linear_probe

    out = tmp_path / "knn.json"
    assert evaluate([str(res["mocov3"].dir), "--knn", str(data / "val"), "--knn-bank", train,
                     "--knn-bank-max-images", "448", "--max-images", "112", "--precision", "fp32",
                     "--workers", "1", "--out", str(out)]) == 0
    last = [r for r in metrics(res["mocov3"].dir) if "knn_top1" in r][-1]
    report = json.loads(out.read_text())
    # (the ranks' batches differ from one process's in the last bits: a tie may flip one image of 112)
    for k in ("knn_top1", "knn_top5"):
        assert abs(report["row"][k] - last[k]) <= 100 / 112 + 1e-9, (k, report["row"][k], last[k])
    probe = tmp_path / "probe.json"
    assert linear_probe([str(res["simclr"].dir), "--train", str(data / "val"), "--val", str(data / "val"),
                         "--workers", "1", "--l2", "1e-3", "--out", str(probe)]) == 0
    assert json.loads(probe.read_text())["probe_train_top1"] > 50  # its own training split: separable features
