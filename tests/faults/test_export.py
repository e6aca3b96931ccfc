"""Point 6: ``tools/export_checkpoint``. Real engines (one process, world size 1) of every
ZeRO stage train two steps, compute image and text embeddings of fixed inputs, and write a
checkpoint through the trainer's own ``checkpoint.save``; the exported safetensors file,
loaded by ``open_clip.create_model(name, pretrained=FILE)``, gives the same embeddings.
Also checks the checkpoint-size estimate of the start-up storage check against these files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors import safe_open

import dtp_ds  # noqa: F401  (registers the dtp_ds models with open_clip)
from dtp_ds.cluster.ports import free_port
from dtp_ds.train.export import export_safetensors, exported_metadata, load_exported
from dtp_ds.train.storage import checkpoint_bytes
from tests.conftest import REPO

DRIP = "DRIP-ViT-Tiny-8-4x"
# (run, model, ZeRO stage, precision)
RUNS = [("s0_fp32", "ViT-Tiny-8", 0, "fp32"), ("s1_bf16", "ViT-Tiny-8", 1, "bf16"),
        ("s2_bf16", DRIP, 2, "bf16"), ("s3_fp32", DRIP, 3, "fp32")]

PROBE = r"""
import logging, os, sys
import deepspeed, open_clip, torch
import dtp_ds
from dtp_ds.train import checkpoint
from dtp_ds.tasks import param_groups
from dtp_ds.tasks.clip import CLIPModule

deepspeed.utils.logger.setLevel(logging.ERROR)
from dtp_ds.cluster.process_group import init_process_group
init_process_group(dist_backend="gloo")
out = sys.argv[1]
for spec in sys.argv[2:]:
    run, name, stage, precision = spec.split(":")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    task = CLIPModule(model, input_dtype=dtype)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": int(stage)}, "bf16": {"enabled": precision == "bf16"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=task, model_parameters=param_groups(task, 0.1), config=cfg)
    g = torch.Generator().manual_seed(1)
    images, texts = torch.rand(4, 3, 64, 64, generator=g), torch.randint(1, 1000, (4, 32), generator=g)
    for _ in range(2):
        engine.backward(engine({"image": images, "text": texts})["loss"])
        engine.step()
    engine.module.eval()
    with torch.no_grad():
        feats = {"image": engine.module.model.encode_image(images.to(dtype)).float(),
                 "text": engine.module.model.encode_text(texts).float(), "images": images, "texts": texts}
    run_dir = os.path.join(out, run)
    checkpoint.save(engine, run_dir, checkpoint.TrainState(step=2),
                    {"model_name": name, "model_cfg": dtp_ds.models.get_model_config(name)}, keep=1)
    torch.save(feats, os.path.join(run_dir, "engine_features.pt"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), *[":".join(map(str, r)) for r in RUNS]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _embed(model: torch.nn.Module, feats: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    model = model.to(dtype).eval()
    with torch.no_grad():
        return (model.encode_image(feats["images"].to(dtype)).float(), model.encode_text(feats["texts"]).float())


@pytest.mark.parametrize("run,name,stage,precision", RUNS)
def test_exported_safetensors_loads_in_open_clip_with_the_engines_embeddings(runs, tmp_path, run, name, stage,
                                                                            precision):
    run_dir = runs / run
    feats = torch.load(run_dir / "engine_features.pt", weights_only=True)
    # export in the engine's precision (bf16 weights are bf16(fp32 masters), as the engine computes with)
    out = tmp_path / f"{run}.safetensors"
    if run == "s0_fp32":  # once through the executable
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_checkpoint"), "--checkpoint", str(run_dir),
                               "--out", str(out), "--dtype", precision], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and str(out) in proc.stdout, proc.stderr[-3000:]
    else:
        export_safetensors(str(run_dir), str(out), precision)
    meta = exported_metadata(str(out))
    assert meta["model_name"] == name and meta["dtype"] == precision and meta["step"] == "2"
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("logit_scale").ndim == 0  # open_clip's default shape
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == \
            {torch.bfloat16 if precision == "bf16" else torch.float32}

    model = open_clip.create_model(name, pretrained=str(out))  # a default open_clip model, after `import dtp_ds`
    image, text = _embed(model, feats, torch.bfloat16 if precision == "bf16" else torch.float32)
    # bit for bit, except that ZeRO-3's own linear function rounds differently (~1e-6)
    tol = {"atol": 1e-5, "rtol": 1e-5} if stage == 3 else {"atol": 0.0, "rtol": 0.0}
    assert torch.allclose(image, feats["image"], **tol) and torch.allclose(text, feats["text"], **tol), \
        ((image - feats["image"]).abs().max(), (text - feats["text"]).abs().max())
    assert load_exported(str(out)).logit_scale.ndim == 0

    # fp32 export of a bf16 run: the fp32 masters, within bf16 rounding of the engine's embeddings
    if precision == "bf16":
        full = tmp_path / f"{run}_fp32.safetensors"
        export_safetensors(str(run_dir), str(full), "fp32")
        image32, _ = _embed(open_clip.create_model(name, pretrained=str(full)), feats, torch.float32)
        assert torch.allclose(image32, feats["image"], atol=5e-2)

    # the start-up storage check's estimate of this checkpoint's size (1 step: Adam moments exist)
    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    actual = sum(p.stat().st_size for p in ckpt.iterdir())
    n_params = sum(p.numel() for p in model.parameters())
    estimate = checkpoint_bytes(n_params, precision, stage)
    assert actual <= estimate <= 1.05 * actual + (2 << 20), (actual, estimate)
