"""The SSL papers' optimisation parts, on the task modules with a real AdamW over the trainer's
parameter groups: MoCo v3's frozen random patch projection, DINO's frozen last layer (first
epoch) and cosine weight decay (schedules with ``before_step``, resumed from their state)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dtp_ds.tasks import TaskSpec, build_task, param_groups
from dtp_ds.tasks.dino import CosineWeightDecay, DINOConfig, FrozenLastLayer
from dtp_ds.tasks.mocov3 import MoCoV3Config
from dtp_ds.train.schedule import Schedules

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64  # ViT-Tiny-8's input


def views(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.rand(n, 3, SIZE, SIZE, generator=g), "view2": torch.rand(n, 3, SIZE, SIZE, generator=g)}


def snapshot(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(prefix)}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    now = dict(module.named_parameters())
    return {n: not torch.equal(t, now[n]) for n, t in before.items()}


def train_steps(task, steps: int, wd: float, epoch: int = 0, schedules: Schedules | None = None,
                opt: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """``steps`` optimizer steps as the Trainer takes them: the schedules' ``before_step``, the
    forward and backward, AdamW over :func:`param_groups`, the LR scheduler (a constant one:
    it sets every group's lr after the step, as the run's does), the schedules' ``step``."""
    if opt is None:
        opt = torch.optim.AdamW(param_groups(task.module, wd), lr=1e-2)
        opt.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    task.module.train()
    for k in range(steps):
        state = SimpleNamespace(step=k, epoch=epoch)
        if schedules:
            schedules.before_step(state, opt.param_groups)
        opt.zero_grad()
        task.module(views(seed=k))["loss"].backward()
        opt.step()
        opt.lr_scheduler.step()
        if schedules:
            schedules.step(SimpleNamespace(step=k + 1, epoch=epoch))
    return opt


@pytest.mark.parametrize("model", ["ViT-Tiny-8", "DRIP-ViT-Tiny-8-4x"])  # the patch stem and the conv stem
def test_mocov3_patch_projection_stays_random_and_the_rest_trains(model):
    torch.manual_seed(0)
    cfg = MoCoV3Config(moco_mlp_dim=32, moco_dim=16)
    task = build_task("mocov3", TaskSpec(model, config=cfg))
    module = task.module
    frozen = [p for p in module.model.patch_embed.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    grouped = {id(p) for g in param_groups(module, 0.05) for p in g["params"]}
    assert not grouped & {id(p) for p in frozen}  # the optimizer never holds them
    assert not any(n.startswith("model.patch_embed") for n, *_ in task.teacher.pairs)  # nor does the EMA
    before = snapshot(module, "model.")
    teacher_before = snapshot(module, "teacher.model.patch_embed")
    train_steps(task, 2, 0.05)
    task.teacher.step(SimpleNamespace(step=1))  # the momentum encoder's update after a step
    moved = changed(before, module)
    assert not any(v for n, v in moved.items() if n.startswith("model.patch_embed")), moved
    assert moved["model.blocks.0.attn.qkv.weight"] and moved["model.pos_embed"]
    teacher = dict(module.named_parameters())
    for name, value in teacher_before.items():  # the momentum encoder's copy: equal to the student's
        assert torch.equal(teacher[name], value)
        assert torch.equal(teacher[name], teacher[name.removeprefix("teacher.")])


def test_mocov3_patch_projection_trains_when_asked():
    torch.manual_seed(0)
    cfg = MoCoV3Config(moco_mlp_dim=32, moco_dim=16, moco_freeze_patch_embed=False)
    task = build_task("mocov3", TaskSpec("ViT-Tiny-8", config=cfg))
    before = snapshot(task.module, "model.patch_embed")
    train_steps(task, 1, 0.05)
    assert all(changed(before, task.module).values())


def test_cosine_weight_decay_start_middle_end_and_resume():
    wd = CosineWeightDecay(0.04, 0.4, 100)
    assert wd.value(0) == pytest.approx(0.04)
    assert wd.value(50) == pytest.approx(0.22)
    assert wd.value(25) == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 4)) / 2)
    assert wd.value(100) == pytest.approx(0.4) and wd.value(120) == pytest.approx(0.4)
    assert wd.metrics(1) == {"weight_decay": wd.value(0)}  # the value the row's step used
    groups = [{"decays": False, "weight_decay": 0.0}, {"decays": True, "weight_decay": 0.04},
              {"decays": True, "weight_decay": 0.04, "group": "last_layer_decay"}]
    wd.before_step(SimpleNamespace(step=50, epoch=3), groups)
    assert [g["weight_decay"] for g in groups] == [0.0, wd.value(50), wd.value(50)]
    resumed = CosineWeightDecay(0.04, 0.4, 100)
    resumed.load_state_dict(wd.state_dict())
    assert [resumed.value(k) for k in range(101)] == [wd.value(k) for k in range(101)]
    for other in (CosineWeightDecay(0.05, 0.4, 100), CosineWeightDecay(0.04, 0.3, 100),
                  CosineWeightDecay(0.04, 0.4, 90)):
        with pytest.raises(ValueError, match="weight-decay schedule"):
            other.load_state_dict(wd.state_dict())


@pytest.fixture
def dino():
    torch.manual_seed(0)
    cfg = DINOConfig(dino_out_dim=32)
    task = build_task("dino", TaskSpec("ViT-Tiny-8", config=cfg, weight_decay=0.04))
    return task, Schedules(task.schedules(total_steps=10))


def test_dino_groups_the_last_layer_apart(dino):
    task, _ = dino
    groups = param_groups(task.module, 0.04)
    assert [g["group"] for g in groups] == ["no_decay", "decay", "last_layer_decay"]  # (its norm is fixed)
    names = {id(p): n for n, p in task.module.named_parameters()}
    assert [names[id(p)] for p in groups[2]["params"]] == ["head.last_layer.weight_v"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.04, 0.04] and [g["decays"] for g in groups] == [
        False, True, True]


def test_dino_last_layer_is_frozen_in_the_first_epoch_only(dino):
    task, schedules = dino
    module = task.module
    before = snapshot(module, "head.")
    opt = train_steps(task, 2, 0.04, epoch=0, schedules=schedules)
    moved = changed(before, module)
    assert not moved["head.last_layer.weight_v"]  # no gradient, no weight decay
    assert module.head.last_layer.weight_v.grad is not None and not module.head.last_layer.weight_v.grad.any()
    assert moved["head.mlp.0.weight"] and schedules.metrics(2)["last_layer_frozen"] == 1.0
    assert opt.param_groups[1]["weight_decay"] == pytest.approx(CosineWeightDecay(0.04, 0.4, 10).value(1))
    train_steps(task, 1, 0.04, epoch=1, schedules=schedules, opt=opt)
    assert changed(before, module)["head.last_layer.weight_v"]
    assert schedules.metrics(3)["last_layer_frozen"] == 0.0


def test_dino_schedules_refuse_another_setting_on_resume(dino):
    task, schedules = dino
    saved = schedules.state_dict()
    assert saved["frozen_last_layer"] == {"epochs": 1}
    assert saved["weight_decay"] == {"start": 0.04, "end": 0.4, "total_steps": 10}
    with pytest.raises(ValueError, match="--dino-freeze-last-layer-epochs"):
        FrozenLastLayer(task.module.head.last_layer, 2).load_state_dict(saved["frozen_last_layer"])


# One process, world size 1, real DeepSpeed engines over the tasks' modules and the trainer's
# parameter groups: two optimizer steps as the Trainer takes them, then (MoCo v3) a checkpoint
# and its export.
ENGINES = r"""
import json, logging, os, sys
from types import SimpleNamespace
import deepspeed, torch
from deepspeed.accelerator import get_accelerator
from dtp_ds.cluster.process_group import init_process_group
from dtp_ds.tasks import TaskSpec, build_task, param_groups
from dtp_ds.tasks.dino import DINOConfig
from dtp_ds.tasks.mocov3 import MoCoV3Config
from dtp_ds.train import checkpoint
from dtp_ds.train.export import fp32_state_dict, resolve_checkpoint_dir
from dtp_ds.train.schedule import Schedules

deepspeed.utils.logger.setLevel(logging.ERROR)
init_process_group(dist_backend="gloo")
out, result = sys.argv[1], {}

def full(engine, name):
    p = dict(engine.module.named_parameters())[name]
    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().float().clone()

for spec in sys.argv[2:]:
    name, stage = spec.split(":")
    torch.manual_seed(0)
    cfg = MoCoV3Config(moco_mlp_dim=32, moco_dim=16) if name == "mocov3" else DINOConfig(dino_out_dim=32)
    task = build_task(name, TaskSpec("ViT-Tiny-8", config=cfg, weight_decay=0.05))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": int(stage)},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=task.module, model_parameters=param_groups(task.module, 0.05), config=ds,
                                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    schedules = Schedules(task.schedules(10))
    watch = ["model.patch_embed.weight", "teacher.model.patch_embed.weight", "model.blocks.0.attn.qkv.weight",
             "head.last_layer.weight_v", "head.mlp.0.weight"]
    watch = [n for n in watch if n in dict(engine.module.named_parameters())]
    before = {n: full(engine, n) for n in watch}
    row = {}
    for k, epoch in enumerate([0, 0, 1]):
        schedules.before_step(SimpleNamespace(step=k, epoch=epoch), engine.optimizer.param_groups)
        g = torch.Generator().manual_seed(k)
        batch = {v: torch.rand(4, 3, 64, 64, generator=g) for v in ("view1", "view2")}
        engine.backward(engine(batch)["loss"])
        engine.step()
        schedules.step(SimpleNamespace(step=k + 1, epoch=epoch))
        row[f"after_{k + 1}"] = {n: not torch.equal(before[n], full(engine, n)) for n in watch}
        row[f"wd_{k + 1}"] = [g["weight_decay"] for g in engine.optimizer.param_groups]
    row["groups"] = [g.get("group") for g in engine.optimizer.param_groups]
    if name == "mocov3":
        row["teacher_equal"] = torch.equal(full(engine, watch[0]), full(engine, watch[1]))
        run_dir = os.path.join(out, spec.replace(":", "_"))
        client = {"model_name": "ViT-Tiny-8", "task": name, "task_state": {}}
        checkpoint.save(engine, run_dir, checkpoint.TrainState(step=3), client, keep=1)
        exported = fp32_state_dict(resolve_checkpoint_dir(run_dir), task.model)
        row["exported_patch_embed_is_the_initial"] = torch.equal(exported["patch_embed.weight"],
                                                                 before["model.patch_embed.weight"])
    result[spec] = row
print("RESULT " + json.dumps(result))
"""
ENGINE_CASES = ["mocov3:1", "mocov3:3", "dino:2"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, dict]:
    import json
    import os
    import subprocess
    import sys

    from dtp_ds.cluster.ports import free_port
    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("ssl_engines")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", ENGINES, str(out), *ENGINE_CASES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("case", ["mocov3:1", "mocov3:3"])
def test_mocov3_patch_projection_under_the_engine(engines, case):
    """ZeRO-1 and ZeRO-3: the frozen patch embedding never moves (nor its momentum-encoder copy),
    the blocks do, and the export (ZeRO-1: no fp32 master for it) holds its initial value."""
    r = engines[case]
    for k in (1, 2, 3):
        moved = r[f"after_{k}"]
        assert not moved["model.patch_embed.weight"] and not moved["teacher.model.patch_embed.weight"]
        assert moved["model.blocks.0.attn.qkv.weight"]
    assert r["teacher_equal"] and r["exported_patch_embed_is_the_initial"]


def test_dino_last_layer_and_weight_decay_under_the_engine(engines):
    """ZeRO-2: the last layer's own groups reach the optimizer; it stays put in epoch 0 and moves
    in epoch 1; every decayed group takes the cosine's value of the step."""
    r = engines["dino:2"]
    assert r["groups"] == ["no_decay", "decay", "last_layer_decay"]
    for k in (1, 2):
        assert not r[f"after_{k}"]["head.last_layer.weight_v"] and r[f"after_{k}"]["head.mlp.0.weight"]
    assert r["after_3"]["head.last_layer.weight_v"]
    wd = CosineWeightDecay(0.05, 0.4, 10)
    for k in (1, 2, 3):
        assert r[f"wd_{k}"] == pytest.approx([0.0, wd.value(k - 1), wd.value(k - 1)])
