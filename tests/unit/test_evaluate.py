"""tools/evaluate (dtp_ds.eval.evaluate): a run's last checkpoint gives the run's last evaluation
row, to the bit; a checkpoint directory, its export and zero_shot_eval on the loaded model agree;
the zero-shot top-1 / top-5 equal open_clip_train's own zero-shot code on the same model and
images; every registered tiny model evaluates; a bad source or split is one line naming the fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import dtp_ds
from dtp_ds.cluster.ports import free_port
from dtp_ds.data.synthetic import render, sample_spec, write_synthetic_dataset
from dtp_ds.eval.boundaries import val_transform
from dtp_ds.eval.evaluate import Plan, Source, evaluate, main
from dtp_ds.eval.retrieval import retrieval_set
from dtp_ds.eval.zeroshot import folder_split, zero_shot_eval
from dtp_ds.train import export
from tests.conftest import REPO, TINY_DS_CONFIG
from tests.unit.test_retrieval import write_caption_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DRIP = "DRIP-ViT-Tiny-8-4x"
CPU = torch.device("cpu")
# keys of an evaluation row that are not metrics (besides train_NAME: the reducer's last training statistics)
BOOKKEEPING = {"step", "epoch", "eval_time", "split"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A real (tiny) training run, one process: 4 steps of DRIP-ViT-Tiny-8-4x with tiny.json
    (bf16 where this CPU has it natively), evaluated at its end on the 48-class zero-shot split
    and the layout split. (run directory, data directory)"""
    out = tmp_path_factory.mktemp("evaluate")
    data = out / "synth"
    write_synthetic_dataset(data, num_train=64, samples_per_shard=32, val_per_class=1, image_size=64, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = ["--deepspeed_config", TINY_DS_CONFIG, "--model", DRIP, "--train-data", f"{data}/train/{{00000..00001}}.tar",
            "--zeroshot-data", str(data / "zeroshot"), "--zeroshot-extra", str(data / "layout"),
            "--logs", str(out / "logs"), "--name", "run", "--batch-size", "16", "--workers", "1", "--warmup", "1",
            "--epochs", "1", "--seed", "0", "--peer-timeout-seconds", "0"]
    proc = subprocess.run([sys.executable, "-m", "dtp_ds.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "logs" / "run", data


def _last_eval_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "zeroshot_top1" in r][-1]


def _class_split(root: Path, classes: int = 6, per_class: int = 4) -> Path:
    """A small class-folder split of synthetic shapes (colour x shape classes), with its names
    and templates: few classes, so a random model's top-1 is not 0."""
    shapes, colors = ["circle", "square", "triangle"], ["red", "blue"]
    names = [f"{c} {s}" for c in colors for s in shapes][:classes]
    for ci, name in enumerate(names):
        color, shape = name.split()
        (root / f"c{ci:03d}").mkdir(parents=True)
        for k in range(per_class):
            rng = np.random.default_rng(1000 * ci + k)
            render(rng, sample_spec(rng, shape=shape, color=color), 64).save(root / f"c{ci:03d}" / f"{k:05d}.jpg")
    (root / "classnames.json").write_text(json.dumps(names))
    (root / "templates.json").write_text(json.dumps(["a photo of a {}.", "a {}."]))
    return root


def test_evaluate_reproduces_the_runs_last_evaluation_row(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate"), str(run_dir), "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    last = _last_eval_row(run_dir)
    want = {k: v for k, v in last.items() if k not in BOOKKEEPING and not k.startswith("train_")}
    assert {"train_compression", "train_boundary_rate"} <= set(last)  # every statistic DRIP declares
    # every metric of the row, the boundary statistics included, bit for bit
    assert report["row"] == want
    assert {"zeroshot_compression", "zeroshot_purity", "layout_prob_spread"} <= set(report["row"])
    assert report["step"] == last["step"] and report["source"] == "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert report["precision"] == ("bf16" if config["ds_config"].get("bf16", {}).get("enabled") else "fp32")
    assert report["batch_size"] == 32  # the run's evaluation batch: 2 x the micro-batch
    assert list(report["zeroshot"]) == ["zeroshot", "layout"]
    assert "zero-shot" in proc.stdout and "compression" in proc.stdout and "purity" in proc.stdout


def test_a_checkpoint_its_export_and_zero_shot_eval_agree(run, tmp_path, capsys):
    run_dir, data = run
    ckpt = next((run_dir / "checkpoints").glob("step_*"))
    model, name = export.load_model_from_checkpoint(str(run_dir))
    direct = zero_shot_eval(model, open_clip.get_tokenizer(name), val_transform(model),
                            folder_split(str(data / "zeroshot")), CPU, batch_size=32, workers=0)
    file = tmp_path / "model.safetensors"
    export.export_safetensors(str(run_dir), str(file), "fp32")
    rows = []
    for source in (str(ckpt), str(file)):
        out = tmp_path / "r.json"
        assert main([source, "--zeroshot", str(data / "zeroshot"), "--precision", "fp32", "--workers", "0",
                     "--batch-size", "32", "--out", str(out)], checkpoints=export) == 0
        report = json.loads(out.read_text())
        assert report["source"] == ("checkpoint" if source == str(ckpt) else "export") and report["step"] == 4
        rows.append(report["row"])
    assert rows[0] == rows[1] == direct


def _accuracy(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy with ``.item()`` where it calls ``float()`` on a
    1-element array, which NumPy 2.4 refuses (TypeError: only 0-dimensional arrays ...)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() for k in topk]


def _open_clip_train_zero_shot(model, split_dir: Path, batch_size: int, monkeypatch) -> tuple[float, float, int]:
    """top-1, top-5 (fractions) by open_clip_train's zero-shot code: its classifier builder and
    its ``run`` (the loop: inputs, ``model(image=...)``, 100 x features @ classifier, top-k
    counts) over the images in folder order."""
    import open_clip_train.zero_shot
    from open_clip import build_zero_shot_classifier

    try:  # its own accuracy where this NumPy runs it
        open_clip_train.zero_shot.accuracy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    except TypeError:
        monkeypatch.setattr(open_clip_train.zero_shot, "accuracy", _accuracy)

    names = json.loads((split_dir / "classnames.json").read_text())
    templates = [lambda c, t=t: t.format(c) for t in json.loads((split_dir / "templates.json").read_text())]
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, open_clip.get_tokenizer(model.name), names, templates,
                                                num_classes_per_batch=10, device=CPU, use_tqdm=False)
    loader = DataLoader(ImageFolder(str(split_dir), transform=val_transform(model)), batch_size=batch_size)
    args = Namespace(device="cpu", precision="fp32", batch_size=batch_size)
    top1, top5 = open_clip_train.zero_shot.run(model, classifier, loader, args)
    return top1, top5, len(loader.dataset)


@pytest.mark.parametrize("name", ["ViT-Tiny-8", DRIP])
def test_zero_shot_equals_open_clip_train(tmp_path, monkeypatch, name):
    split = _class_split(tmp_path / "split")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    model.name = name
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "r.json"
    # the plain open_clip path: a model name with --pretrained FILE
    assert main([name, "--pretrained", str(weights), "--zeroshot", str(split), "--workers", "0", "--batch-size", "8",
                 "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["zeroshot"]["split"]
    top1, top5, n = _open_clip_train_zero_shot(model, split, 8, monkeypatch)
    assert ours["images"] == n == 24
    assert round(ours["top1"] * n / 100) == round(top1 * n) and round(ours["top5"] * n / 100) == round(top5 * n)


def test_as_ranks_splits_the_images_without_changing_the_counts(tmp_path):
    split = folder_split(str(_class_split(tmp_path / "split", per_class=3)))
    torch.manual_seed(0)
    model = open_clip.create_model(DRIP).eval()
    args = (model, open_clip.get_tokenizer(DRIP), val_transform(model), split, CPU)
    one = zero_shot_eval(*args, batch_size=4, workers=0)
    three = zero_shot_eval(*args, batch_size=4, workers=0, as_ranks=3)
    assert {k: three[k] for k in ("zeroshot_top1", "zeroshot_top5", "zeroshot_images", "zeroshot_compression")} == \
        {k: one[k] for k in ("zeroshot_top1", "zeroshot_top5", "zeroshot_images", "zeroshot_compression")}
    assert three["zeroshot_prob_spread"] == pytest.approx(one["zeroshot_prob_spread"])


def test_every_registered_tiny_model_evaluates(tmp_path):
    split = folder_split(str(_class_split(tmp_path / "split", classes=3, per_class=2)))
    write_caption_shards(tmp_path / "shards", shards=1, per_shard=4, json_shards=())
    rset = retrieval_set(str(tmp_path / "shards"))
    names = [n for n in dtp_ds.list_models() if "Tiny-8" in n]
    assert len(names) >= 10
    for name in names:
        torch.manual_seed(0)
        src = Source(open_clip.create_model(name).eval(), name, "open_clip", "-")
        plan = Plan([split], [rset], "fp32", 4, None, None, None, 0, [])
        report = evaluate(src, plan, CPU)
        row = report["row"]
        assert row["zeroshot_images"] == 6 and row["retrieval_images"] == 4 and row["retrieval_texts"] == 8, name
        assert 0 <= row["zeroshot_top1"] <= row["zeroshot_top5"] <= 100, name
        if name.startswith("DRIP"):  # the boundary statistics of the reducer that groups patches
            assert row["zeroshot_compression"] > 1 and "retrieval_compression" in row, name


def _error(capsys, argv: list[str]) -> str:
    assert main(argv, checkpoints=export) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error: "), err
    return err[0]


def test_bad_sources_and_splits_are_one_line_naming_the_fix(run, tmp_path, capsys):
    run_dir, data = run
    zs = ["--zeroshot", str(data / "zeroshot")]
    assert "run directory (LOGS/NAME)" in _error(capsys, [str(tmp_path / "nowhere"), *zs])
    (tmp_path / "empty").mkdir()
    assert "not a dtp_ds checkpoint" in _error(capsys, [str(tmp_path / "empty"), *zs])
    (tmp_path / "w.pt").write_bytes(b"")
    assert "--pretrained" in _error(capsys, [str(tmp_path / "w.pt"), *zs])
    assert "--pretrained FILE" in _error(capsys, ["ViT-Tiny-8", *zs])
    assert "drop --pretrained" in _error(capsys, [str(run_dir), "--pretrained", "x.pt", *zs])
    assert "classnames.json" in _error(capsys, [str(run_dir), "--zeroshot", str(data / "train")])
    assert "1000 wnid folders" in _error(capsys, [str(run_dir), "--imagenet-val", str(data / "zeroshot")])
    assert "no shard matches" in _error(capsys, [str(run_dir), "--retrieval", str(tmp_path / "{00000..00001}.tar")])
    file = tmp_path / "m.safetensors"
    export.export_safetensors(str(run_dir), str(file))
    assert "nothing to evaluate" in _error(capsys, [str(file)])
