"""Linear probe (dtp_ds.eval.linear_probe, tools/linear_probe): separable features are probed
to ~100%, the L2 choice uses the held-out part, and an untrained tiny trunk on the synthetic
class split beats chance (in-process and through the CLI)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dtp_ds.eval.classify import class_split
from dtp_ds.eval.linear_probe import eval_transform, fit_logistic, holdout_split, linear_probe, linear_probe_eval, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g) + 50.0, y  # an offset standardising removes


def test_separable_features_are_probed_to_100_percent():
    x, y = blobs(400, 10, 32, 0.3, 0)
    vx, vy = blobs(200, 10, 32, 0.3, 1)
    res = linear_probe(x, y, vx, vy, 10)
    assert res["probe_top1"] == pytest.approx(100.0) and res["probe_top5"] == pytest.approx(100.0)
    assert res["probe_l2"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and res["probe_chance_top1"] == pytest.approx(10)
    # shuffled training labels: nothing to learn, the probe falls to about chance
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, shuffled, vx, vy, 10)["probe_top1"] < 30


def test_fit_is_deterministic_and_regularised():
    x, y = blobs(100, 4, 8, 1.0, 2)
    a, b = fit_logistic(x - x.mean(0), y, 4, 1e-3), fit_logistic(x - x.mean(0), y, 4, 1e-3)
    assert torch.equal(a.weight, b.weight)
    strong = fit_logistic(x - x.mean(0), y, 4, 10.0)
    assert strong.weight.norm() < 0.2 * a.weight.norm()
    state = torch.random.get_rng_state()
    fit_logistic(x, y, 4, 1e-3)
    assert torch.equal(state, torch.random.get_rng_state())  # draws nothing from the global RNG
    fit, held = holdout_split(10)
    assert len(held) == 2 and sorted(torch.cat([fit, held]).tolist()) == list(range(10))


@pytest.fixture(scope="module")
def synth_split(tmp_path_factory) -> Path:
    """The synthetic class split (56 colour / background classes, 64 px) at a test's size."""
    from dtp_ds.data.synthetic import write_classify_split

    out = tmp_path_factory.mktemp("probe")
    write_classify_split(out, num_train=560, samples_per_shard=280, val_per_class=2, image_size=64, seed=0)
    return out / "classify"


def test_an_untrained_tiny_trunk_beats_chance_on_the_synthetic_split(synth_split):
    from dtp_ds.models import vision_tower

    torch.manual_seed(0)
    trunk = vision_tower("ViT-Tiny-8", 0)  # pooled features, no head
    train = class_split(str(synth_split / "train" / "{00000..00001}.tar"))
    val = class_split(str(synth_split / "val"))
    res = linear_probe_eval(trunk, eval_transform(trunk), train, val, torch.device("cpu"), batch_size=64,
                            workers=0, l2_grid=(1e-4, 1e-2))
    assert res["probe_train_images"] == 560 and res["probe_images"] == 112 and res["probe_classes"] == 56
    assert res["probe_top1"] > 3 * res["probe_chance_top1"], res


def test_the_cli_on_a_random_init_model(synth_split, tmp_path, capsys):
    out = tmp_path / "probe.json"
    rc = main(["ViT-Tiny-8", "--random-init", "--train", str(synth_split / "train" / "{00000..00001}.tar"),
               "--val", str(synth_split / "val"), "--l2", "1e-3", "--workers", "0", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["probe_images"] == 112 and res["probe_top1"] > res["probe_chance_top1"], res
    assert "linear probe of ViT-Tiny-8 (random init" in capsys.readouterr().out
    assert main(["ViT-Tiny-8", "--random-init", "--train", str(tmp_path / "nothing"), "--val",
                 str(synth_split / "val"), "--workers", "0"]) == 2
    assert "--train" in capsys.readouterr().err


def test_the_cli_sets_its_threads(synth_split, tmp_path, capsys):
    """--threads N, else the CPUs the process may run on (not torch's own default)."""
    from dtp_ds.eval.linear_probe import cpu_count

    args = ["ViT-Tiny-8", "--random-init", "--train", str(synth_split / "train" / "00000.tar"),
            "--val", str(synth_split / "val"), "--l2", "1e-3", "--workers", "0", "--device", "cpu",
            "--max-images", "8", "--train-max-images", "16"]
    assert main([*args, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    assert main(args) == 0 and torch.get_num_threads() == cpu_count() == len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit):
        main([*args, "--threads", "0"])
    assert "--threads 0: give at least 1" in capsys.readouterr().err
