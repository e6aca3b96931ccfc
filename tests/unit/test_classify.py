"""``--task classify`` in one process: the classifier over every tiny trunk, Mixup / CutMix
targets, seeded augmentation, the class-folder training loader (order, ranks, resume, bad
images), evaluation on class folders and on cls shards, and the flags (the recipe's included)."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

import dtp_ds
from dtp_ds.data.folder import class_folder, make_folder_loader
from dtp_ds.data.shards import DataConfig, plan_epoch
from dtp_ds.eval.classify import class_split, classify_eval
from dtp_ds.models import vision_tower
from dtp_ds.tasks import TaskSpec, build_task
from dtp_ds.tasks.classify import ClassifyConfig, ClassifyModule, LabelStage, make_mixup, transforms
from dtp_ds.train.args import ConfigError, parse_args
from tests.conftest import REPO

TINY = [n for n in dtp_ds.list_models() if "Tiny" in n]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", [*TINY, "ViT-Tiny-8"])
def test_every_trunk_classifies_and_every_parameter_gets_a_gradient(name):
    """Each tiny trunk (each reducer family; ViT-Tiny-8 is an open_clip config: the plain trunk
    pooling the class token) as a 48-class classifier under Mixup / CutMix, its auxiliary
    losses added as training adds them."""
    torch.manual_seed(0)
    model = vision_tower(name, 48, drop_path_rate=0.1)
    module = ClassifyModule(model, 0.1, make_mixup(ClassifyConfig(mixup=0.8, cutmix=1.0), 48)).train()
    out = module({"image": torch.randn(4, 3, *model.img_size), "label": torch.tensor([0, 5, 47, 5])})
    out["loss"].backward()
    assert model.head.weight.shape == (48, model.embed_dim) and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(out["ce_loss"].item() + sum(
        out[k].item() for k in ("boundary_loss", "ratio_loss", "distill_loss") if k in out), rel=1e-5)
    if name == "ViT-Tiny-8":
        assert model.global_pool == "cls" and model.reducer.type_name == "none"
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_targets_sum_to_one(mixup, cutmix):
    """Every row of the soft targets is a distribution over the two classes it mixes (label
    smoothing spread over the rest); evaluation sees the class indices, unmixed."""
    np.random.seed(0)
    n = 10
    module = ClassifyModule(torch.nn.Identity(), 0.1, make_mixup(ClassifyConfig(mixup=mixup, cutmix=cutmix), n))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    for _ in range(20):
        images, targets = module.targets(torch.rand(8, 3, 16, 16), labels)
        assert targets.shape == (8, n) and (targets >= 0).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        pair = torch.stack([labels, labels.flip(0)], 1)  # mode "batch": each sample with its mirror
        for row, two in zip(targets, pair):  # above the smoothing floor: only the two mixed classes
            assert set((row > 0.1 / n + 1e-6).nonzero().flatten().tolist()) <= set(two.tolist())
        assert (targets.argmax(1)[:, None] == pair).any(1).all()
    module.eval()
    x = torch.rand(8, 3, 16, 16)
    images, targets = module.targets(x, labels)
    assert images is x and targets is labels


def test_label_stage_augmentation_is_seeded_and_checks_the_label():
    """RandAugment and random erasing draw from python's and numpy's RNGs: a sample's
    augmentation follows the torch seed the loader sets for it, whatever those RNGs hold, and
    leaves them as they were."""
    from PIL import Image

    model = vision_tower("ViT-Tiny-8", 48)
    train, _ = transforms(model, ClassifyConfig(aa="rand-m9-mstd0.5-inc1", reprob=0.5))
    stage = LabelStage(train, 48)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    outs = []
    for noise in (1, 2):
        random.seed(noise)
        np.random.seed(noise)
        before = (random.random(), np.random.rand())
        random.seed(noise)
        np.random.seed(noise)
        torch.manual_seed(1234)
        x, y = stage(image, {"cls": b"7"})
        assert (random.random(), np.random.rand()) == before  # the host RNGs are left as they were
        outs.append(x)
    assert y.item() == 7 and x.shape == (3, 64, 64)
    torch.testing.assert_close(outs[0], outs[1])
    torch.manual_seed(99)
    assert not torch.equal(stage(image, {"cls": b"7"})[0], outs[0])
    with pytest.raises(ValueError, match="outside"):
        stage(image, {"cls": b"48"})


def _batches(folder, stage, world, rank, done=0, workers=0):
    plan = plan_epoch(len(folder.samples), 16, world, 1, 1)  # (the loader's own workers do not change it)
    loader = make_folder_loader(DataConfig(workers=workers), folder, plan, stage, 16, 1, 0, rank, world, done)
    return list(loader), plan


def test_folder_loader_order_ranks_resume_and_bad_images(synth_cls, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(synth_cls / "classify" / "val", root, ignore=shutil.ignore_patterns("*.json"))
    model = vision_tower("ViT-Tiny-8", 48)
    stage = LabelStage(transforms(model, ClassifyConfig())[1], 56)  # deterministic: compare batches
    folder = class_folder(str(root))
    assert len(folder.classes) == 56 and len(folder.samples) == 448
    full, plan = _batches(folder, stage, world=2, rank=0)
    other, _ = _batches(folder, stage, world=2, rank=1, workers=2)
    assert len(full) == len(other) == plan.batches_per_rank == 14
    labels = torch.cat([b[1] for b in full + other])
    assert labels.bincount(minlength=56).tolist() == [8] * 56  # the epoch: every image once
    resumed, _ = _batches(folder, stage, world=2, rank=0, done=4)
    assert len(resumed) == 10
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # labels are ImageFolder's (sorted folders) and an unreadable image is counted and replaced
    (root / "c003" / "00002.jpg").write_bytes(b"not a jpeg")
    batches, _ = _batches(class_folder(str(root)), stage, world=1, rank=0)
    assert sum(b[2].counts.get("decode_error", 0) for b in batches) == 1
    assert all(len(b[1]) == 16 for b in batches)


def test_evaluation_on_class_folders_and_cls_shards_agree(synth_cls):
    torch.manual_seed(0)
    model = vision_tower("DRIP-ViT-Tiny-8-4x", 56)
    tf = transforms(model, ClassifyConfig())[1]
    data = synth_cls / "classify"
    folder, shards = class_split(str(data / "val")), class_split(str(data / "val_shards" / "00000.tar"))
    assert (folder.name, folder.num_classes, shards.name, shards.num_classes) == ("val", 56, "val_shards", None)
    a = classify_eval(model, tf, folder, torch.device("cpu"), batch_size=50, workers=0)
    b = classify_eval(model, tf, shards, torch.device("cpu"), batch_size=64, workers=2)
    for key in ("val_top1", "val_top5", "val_images", "val_compression"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert a["val_images"] == 448 and a["val_chance_top1"] == pytest.approx(100 / 56) and a["val_unusable"] == 0
    assert "val_purity" in a and "val_purity" not in b  # the folder split records its objects
    capped = classify_eval(model, tf, shards, torch.device("cpu"), max_images=96, workers=0, prefix="x_")
    assert capped["x_images"] == 96


# the README's recipe (ViT paper's setting), flags as documented there
RECIPE = ["--task", "classify", "--model", "ViT-B-32", "--deepspeed_config",
          str(REPO / "ds_configs" / "classify_vit_b_32.json"),
          "--train-data", "/data/imagenet/train", "--val-data", "/data/imagenet/val", "--epochs", "300",
          "--warmup", "10000", "--lr-scheduler", "cosine", "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5-inc1",
          "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--reprob", "0.25"]


def test_recipe_flags_and_refusals():
    from dtp_ds.tasks import param_groups
    from dtp_ds.train.ds_config import load_ds_config, resolve

    args = parse_args(RECIPE)
    c = args.task_config
    assert (c.mixup, c.cutmix, c.smoothing, c.drop_path, c.aa, c.reprob) == (0.8, 1.0, 0.1, 0.1,
                                                                             "rand-m9-mstd0.5-inc1", 0.25)
    ds, _ = resolve(load_ds_config(args.run.deepspeed_config), args, world_size=4)
    assert ds["train_batch_size"] == 4096 and ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999] and ds["gradient_clipping"] == 1.0
    c.num_classes = 1000
    task = build_task("classify", TaskSpec("ViT-B-32", config=c))
    assert task.model.num_classes == 1000 and task.model.blocks[-1].drop_path == pytest.approx(0.1)
    groups = param_groups(task.module, 0.3)
    assert {n for n, p in task.module.named_parameters() if any(p is q for q in groups[0]["params"])} >= {
        "model.pos_embed", "model.cls_token", "model.norm.weight"}
    for argv, message in [
            (["--val-data", "x"], r"--val-data \(--task classify\): not flags of --task clip"),
            (["--mixup", "0.2"], r"--mixup \(--task classify\)"),
            (["--task", "classify", "--zeroshot-data", "x"], r"--zeroshot-data \(--task clip\): not flags of"),
            (["--zeroshot-frequency", "2"], "--zeroshot-frequency was renamed --eval-frequency"),
            (["--task", "nosuch"], "unknown task 'nosuch'"),
            (["--task", "classify", "--scale", "0.9", "0.5"], "--scale"),
            (["--task", "classify", "--smoothing", "1.0"], "--smoothing")]:
        with pytest.raises(ConfigError, match=message):
            parse_args(["--train-data", "x.tar", *argv])
