"""Boundary visualisation and checkpoint export: real DeepSpeed checkpoints (one process,
world size 1, one training step) of every ZeRO stage, real image files, real PNGs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import dtp_ds  # noqa: F401  (registers the DRIP configs)
from dtp_ds.cluster.ports import free_port
from dtp_ds.data.synthetic import render, sample_spec
from dtp_ds.eval.boundaries import (
    TITLE_PX,
    extract_boundaries,
    list_images,
    png_size,
    val_transform,
    visualize,
)
from dtp_ds.models import CONFIG_DIR, get_model_config, record_forward, register_config, registry, trunks, vision_tower
from dtp_ds.models.registry import load_config
from dtp_ds.train.export import load_model_from_checkpoint, resolve_checkpoint_dir
from dtp_ds.train.visualize import main

REPO = Path(__file__).resolve().parents[2]
DRIP = "DRIP-ViT-Tiny-8-4x"
# (run name, model, ZeRO stage, precision)
RUNS = [
    ("s0_fp32", DRIP, 0, "fp32"),
    ("s0_bf16", DRIP, 0, "bf16"),
    ("s1_fp32", DRIP, 1, "fp32"),
    ("s2_bf16", DRIP, 2, "bf16"),
    ("s3_bf16", DRIP, 3, "bf16"),
]
# Names registered at run time in the training process only (as a user's own config would be).
CUSTOM = [("custom_plain", "ViT-Tiny-8-custom", 0, "fp32"), ("custom_drip", DRIP + "-custom", 0, "fp32")]

# One process, world size 1: for each run, one training step through a real engine, a
# checkpoint written by the trainer's own save(), and the engine's fp32 masters (read from the
# live optimizer, not from the files) as the reference.
MAKE_CHECKPOINTS = r"""
import logging, os, sys
import deepspeed, open_clip, torch
import dtp_ds
from deepspeed.utils import safe_get_full_fp32_param
from dtp_ds.train import checkpoint
from dtp_ds.models import registry
from dtp_ds.tasks import param_groups
from dtp_ds.tasks.clip import CLIPModule

deepspeed.utils.logger.setLevel(logging.ERROR)
from dtp_ds.cluster.process_group import init_process_group
init_process_group(dist_backend="gloo")
out = sys.argv[1]
for spec in sys.argv[2:]:
    run, name, stage, precision = spec.split(":")
    stage = int(stage)
    if name.endswith("-custom"):
        base = name.removesuffix("-custom")
        registry.register_config(name, registry.load_config(registry.CONFIG_DIR / f"{base}.json"))
    torch.manual_seed(stage)
    model = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    task = CLIPModule(model, input_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=task, model_parameters=param_groups(task, 0.1), config=cfg)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.rand(4, 3, size, size)
    texts = torch.randint(1, 1000, (4, model.context_length))
    loss = engine({"image": images, "text": texts})["loss"]
    engine.backward(loss)
    engine.step()
    named = dict(engine.module.named_parameters())
    if stage == 0 and precision != "fp32":  # DeepSpeed's fp16 optimizer wrapper: masters by identity
        by_id = {id(lp): hp for lg, hg in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
                 for lp, hp in zip(lg, hg)}
        ref = {n: by_id[id(p)].detach().float().clone() for n, p in named.items()}
    elif stage == 0:
        ref = {n: p.detach().clone() for n, p in named.items()}
    else:
        ref = {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in named.items()}
    run_dir = os.path.join(out, run)
    client = {"model_name": name, "model_cfg": open_clip.get_model_config(name)}
    checkpoint.save(engine, run_dir, checkpoint.TrainState(step=1, samples_seen=4), client, keep=1)
    torch.save({n.removeprefix("model."): t for n, t in ref.items()}, os.path.join(run_dir, "reference.pt"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpts")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    specs = [f"{run}:{model}:{stage}:{precision}" for run, model, stage, precision in RUNS + CUSTOM]
    proc = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINTS, str(out), *specs], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(autouse=True, scope="module")
def _forget_custom_names():
    """Loading the custom runs registers their names here: remove them afterwards."""
    yield
    for _, name, _, _ in CUSTOM:
        registry._REGISTERED.pop(name, None)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Six synthetic shape images (64 px JPEGs) in two class folders."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(6):
        rng = np.random.default_rng(i)
        folder = root / f"c{i % 2:03d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        render(rng, sample_spec(rng), 64).save(path, quality=95)
        paths.append(str(path))
    return paths


def _confident_model(name: str = DRIP) -> torch.nn.Module:
    """A fresh DRIP model whose predictor places boundaries in eval mode (an untrained one
    starts at the prior, probability 1 / compression < 0.5, so it would place none)."""
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    pred = trunks(model)[0].reducer.boundary_predictor
    if hasattr(pred, "fc2"):  # DTP's MLP; the shipped top-k router places its boundaries from the start
        with torch.no_grad():
            pred.fc2.weight.mul_(300.0)
            pred.fc2.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("run,model_name,stage,precision", RUNS)
def test_export_loads_the_fp32_masters(runs, run, model_name, stage, precision):
    model, name = load_model_from_checkpoint(str(runs / run))
    assert name == model_name and not model.training
    ref = torch.load(runs / run / "reference.pt", weights_only=True)
    state = model.state_dict()
    assert set(ref) <= set(state)
    for key, value in ref.items():
        assert state[key].dtype == torch.float32, key
        assert torch.equal(state[key], value), key
    if precision == "bf16":  # the masters carry more than the 16-bit copies do
        assert any(not torch.equal(v, v.bfloat16().float()) for v in ref.values())
    # the checkpoint stored open_clip's form of the config (as checkpoints did before
    # get_model_config): reading it leaves the registered dtp_ds form, which the trunk builds from
    assert "reducer_cfg" in get_model_config(model_name)["vision_cfg"]
    assert vision_tower(model_name, 0).reducer is not None


def test_export_accepts_each_path_form_and_refuses_others(runs, tmp_path):
    run = runs / "s3_bf16"
    step = run / "checkpoints" / "step_00000001"
    for form in (run, run / "checkpoints", step, f"{step}/"):
        assert resolve_checkpoint_dir(str(form)) == str(step)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model_from_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a dtp_ds checkpoint"):
        load_model_from_checkpoint(str(tmp_path))
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model_from_checkpoint(str(tmp_path / "file.pt"))
    (tmp_path / "run" / "checkpoints" / "step_00000007").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="latest.*step_00000007"):
        load_model_from_checkpoint(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="step_00000007.*incomplete"):
        load_model_from_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000007"))


@pytest.mark.parametrize("name", [DRIP, DRIP + "-up"])
def test_boundaries_are_the_ones_the_forward_pools_with(images, name):
    model = _confident_model(name)
    batch = torch.stack([val_transform(model)(Image.open(p)) for p in images])
    trunk = trunks(model)[0]
    used = []  # the packing the first short block runs on: the segments the forward really made
    first_short = trunk.blocks[trunk.reducer.layout[0]]
    handle = first_short.register_forward_pre_hook(lambda _m, args: used.append(args[1].counts.clone()))
    try:
        found = extract_boundaries(model, batch)
        counts = torch.tensor([b.num_segments for b in found])
        assert torch.equal(used[-1], counts)
        with record_forward() as rec, torch.no_grad():  # the model is in eval mode: the same segments
            model.visual(batch)
        assert rec[0].stats["compression"].item() == pytest.approx(counts.numel() * 64 / counts.sum().item())
        again = extract_boundaries(model, batch)  # eval boundaries are deterministic
    finally:
        handle.remove()
    for a, b in zip(found, again):
        assert np.array_equal(a.hard, b.hard)
    for b in found:
        assert b.grid == (8, 8) and b.num_patches == 64
        # the eval rule cuts at the most probable patches (threshold, expected count or top-k
        # budget); a boundary on the last patch cuts nothing, so the groups do not show it
        chosen, rest = b.probs[:-1][b.hard[:-1]], b.probs[:-1][~b.hard[:-1]]
        assert chosen.size and (not rest.size or chosen.min() >= rest.max())
        # a boundary ends its segment: the next patch starts a new one
        starts = np.flatnonzero(np.diff(b.segments)) + 1
        assert np.array_equal(starts, np.flatnonzero(b.hard[:-1]) + 1)
        assert b.compression == 64 / b.num_segments
    assert 1 < counts.float().mean() < 64  # a non-trivial picture
    # one image alone gets the same boundaries as in the batch (padded keys are masked)
    solo = extract_boundaries(model, batch[2:3])[0]
    assert np.array_equal(solo.hard, found[2].hard)


def test_visualize_writes_one_png_per_image(images, tmp_path):
    model = _confident_model()
    root = os.path.dirname(os.path.dirname(images[0]))
    written = visualize(model, DRIP, images, str(tmp_path / "out"), image_root=root, batch_size=4)
    assert [os.path.basename(w.png) for w in written] == [
        f"c{i % 2:03d}_{i:05d}.png" for i in range(6)]
    assert png_size(64, 64) == (512, 512 + TITLE_PX)
    for w in written:
        with Image.open(w.png) as png:
            assert png.format == "PNG" and png.size == (512, 512 + TITLE_PX)
            pixels = np.asarray(png.convert("RGB"))
        assert pixels[TITLE_PX:].std() > 10  # an image was drawn, not a blank canvas


def test_tool_end_to_end_on_a_zero3_checkpoint(runs, images, tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(images[0]))
    assert list_images(root, 4) == sorted(images)[:4]
    out = tmp_path / "pngs"
    rc = main(["--checkpoint", str(runs / "s3_bf16"), "--image-dir", root, "--max-images", "4", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(lines) == 5 and "mean compression" in lines[-1]
    for line in lines[:4]:
        png = line.split(":")[0]
        assert os.path.isfile(png) and "compression" in line
    assert sorted(os.listdir(out)) == sorted(os.path.basename(line.split(":")[0]) for line in lines[:4])


def test_names_unknown_here_come_from_the_checkpoint(runs):
    # a plain open_clip config: registered from the checkpoint's model_cfg
    model, name = load_model_from_checkpoint(str(runs / "custom_plain"))
    ref = torch.load(runs / "custom_plain" / "reference.pt", weights_only=True)
    assert name == "ViT-Tiny-8-custom" and all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    # a DRIP one: the stored config names a trunk registered only in the training process
    with pytest.raises(ValueError, match="needs the DRIP trunk 'dtp_drip_vit_tiny_8_4x_custom'"):
        load_model_from_checkpoint(str(runs / "custom_drip"))
    register_config(DRIP + "-custom", load_config(CONFIG_DIR / f"{DRIP}.json"))
    model, _ = load_model_from_checkpoint(str(runs / "custom_drip"))
    ref = torch.load(runs / "custom_drip" / "reference.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def test_non_drip_models_are_refused(runs, images, tmp_path, capsys):
    plain = open_clip.create_model("ViT-Tiny-8", output_dict=True)
    with pytest.raises(ValueError, match="no token reducer that groups patches"):
        extract_boundaries(plain, torch.zeros(1, 3, 64, 64))
    rc = main(["--checkpoint", str(runs / "custom_plain"), "--images", images[0], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "model 'ViT-Tiny-8-custom' has no token reducer that groups patches" in err
    assert not (tmp_path / "out").exists()
