"""A task is one file: this file's rotation task (RotNet: which quarter-turn was an image given?)
trains through ``--task tests/dist/test_task_seam.py`` with no edit to dtp_ds: its own settings
(``--rotations``), data stage, class-folder training data, checkpoint state and export. In the
same launch ``--task classify --accum-freq 2`` accumulates two micro-batches the plain way (its
loss does not couple the batch), and a CLIP flag on this task is refused by name."""
from __future__ import annotations

import json
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

pytestmark = pytest.mark.dist
THIS = Path(__file__).resolve()


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


def test_a_task_in_its_own_file_trains_and_exports(synth_cls, tmp_path):
    data = synth_cls / "classify"
    common = ["--deepspeed_config", TINY_DS_CONFIG, "--model", "DRIP-ViT-Tiny-8-4x", "--logs", str(tmp_path),
              "--batch-size", "8", "--workers", "1", "--warmup", "1", "--log-every-n-steps", "1",
              "--precision", "fp32", "--train-num-samples", "64", "--seed", "0"]
    runs = {
        # class folders as training data, ZeRO-2, two micro-batches accumulated per step
        "rotation": ["--task", str(THIS), "--rotations", "2", "--train-data", str(data / "val"), "--name", "rotation",
                     "--zero-stage", "2", "--accum-freq", "2", *common],
        "classify": ["--task", "classify", "--train-data", f"{data}/train/{{00000..00011}}.tar", "--num-classes",
                     "56", "--name", "classify", "--zero-stage", "1", "--accum-freq", "2", "--eval-frequency", "0",
                     *common],
        "refused": ["--task", str(THIS), "--local-loss", "--train-data", str(data / "val"), "--name", "refused",
                    *common],
    }
    res = run_many(runs, tmp_path / "launch")
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
