"""The reducer seam: a reducer written in a test's own file trains a CLIP model on 2 ranks
under ZeRO-2 through the unchanged trainer; its auxiliary loss, statistics and token counts
reach the metrics. Every shipped reducer family trains under ZeRO-3. All runs share one launch
with tests/dist/test_seqcomp_schedule.py's (tests/dist/conftest.py)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import base_args, step_records

pytestmark = pytest.mark.dist


REDUCERS = {"ToMe-ViT-Tiny-8": True, "PatchDrop-ViT-Tiny-8": True, "TokenLearner-ViT-Tiny-8": True,
            "Grouping-ViT-Tiny-8": True, "DynamicViTDrop-ViT-Tiny-8": True, "DynamicViT-ViT-Tiny-8": False}


def planned_runs(synth, logs) -> dict[str, list[str]]:
    """This module's runs (name -> argv), trained in tests/dist/conftest.py's shared launch."""
    with open("dtp_ds/models/configs/ViT-Tiny-8.json") as f:
        cfg = json.load(f)
    cfg["vision_cfg"]["reducer_cfg"] = {"type": "tests.dist.toy_reducer:StrideReducer", "at": 2, "stride": 2}
    model = logs / "Stride-ViT-Tiny-8.json"
    model.write_text(json.dumps(cfg))
    toy = base_args(synth, logs, "toy", "--zero-stage", "2", "--precision", "fp32", "--max-steps", "6", "--lr", "2e-3")
    toy[toy.index("--model") + 1] = str(model)
    todo = {"toy": toy}
    for name in REDUCERS:
        args = base_args(synth, logs, name, "--zero-stage", "3", "--precision", "fp32", "--max-steps", "10",
                         "--lr", "2e-3", "--zeroshot-data", str(synth / "zeroshot"), "--eval-frequency", "1",
                         "--eval-max-images", "16")
        args[args.index("--model") + 1] = name
        todo[name] = args
    return todo


@pytest.fixture(scope="module")
def runs(shared_launch):
    done = {name: shared_launch[name] for name in ("toy", *REDUCERS)}
    for name, result in done.items():
        assert result.rc == [0, 0], (name, result.stderr)
    return done


def test_a_reducer_of_ones_own_trains_under_zero2(runs):
    rows = step_records(runs["toy"].dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    # 64 patches: blocks 0-1 see 65 tokens, blocks 2-5 CLS + 32
    assert rows[-1]["image_tokens"] == pytest.approx((2 * 65 + 4 * 33) / 6)
    assert rows[-1]["kept_fraction"] == pytest.approx(0.5)
    assert all(r["loss"] == pytest.approx(r["contrastive_loss"] + r["gate_loss"], rel=1e-5) for r in rows)
    assert rows[-1]["gate_loss"] < rows[0]["gate_loss"]  # the reducer's own parameter learned
    saved = json.loads((runs["toy"].dir / "config.json").read_text())
    assert saved["model_cfg"]["vision_cfg"]["reducer_cfg"]["type"] == "tests.dist.toy_reducer:StrideReducer"


def planned_compression(model: str) -> float:
    """Patches over the fewest tokens the reducer plans for in training (CLS aside)."""
    import open_clip

    from dtp_ds.models import trunks

    (t,) = trunks(open_clip.create_model(model, device="meta"))
    return t.num_patches / (min(t.reducer.planned_tokens(t.num_patches, t.depth)) - 1)


def sampled_keep_target(model: str) -> float:
    """The keep ratio DynamicViT's ratio loss holds its last stage's mean policy at."""
    import open_clip

    from dtp_ds.models import trunks

    (t,) = trunks(open_clip.create_model(model, device="meta"))
    return t.reducer.ratios[-1]


@pytest.mark.parametrize("model", list(REDUCERS))
def test_reducers_train_under_zero3_and_save_their_schedules(runs, tmp_path, model):
    """ToMe, patch dropout, TokenLearner, grouping and DynamicViT train on 2 ranks under ZeRO-3 (loss
    falls, ranks agree); patch dropout's unmasked-final-segment schedule is saved with the
    checkpoint; the export reloads to the checkpoint's embeddings. DynamicViT's training
    compression is its sampled policy's: between its keep ratio's and none."""
    import torch

    from dtp_ds.train.export import export_safetensors, load_exported, load_model_from_checkpoint

    fixed, run = REDUCERS[model], runs[model].dir
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("zeroshot_top1" in r for r in logged)  # the end-of-run evaluation ran with this reducer
    rows = step_records(run)
    losses = [r["loss"] for r in rows]
    assert len(rows) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    if fixed:
        assert rows[-1]["compression"] == pytest.approx(planned_compression(model), rel=1e-5)
    else:  # the sampled policy, held by its ratio loss near the last stage's keep ratio (rho ** 3: 4.9x)
        assert rows[-1]["compression"] == pytest.approx(1 / sampled_keep_target(model), rel=0.3)
    final = [r for r in logged if "params_finite" in r][-1]
    assert final["params_finite"] and final["param_fingerprint_by_rank"][0] == final["param_fingerprint_by_rank"][1]
    ckpt = run / "checkpoints" / "step_00000010"
    states = torch.load(next(ckpt.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    schedules = states["schedules"]
    if model.startswith("PatchDrop"):
        assert schedules == {"reducer0_patch_dropout": {"step_done": 10, "switch_at": 68, "total_steps": 75}}
    else:
        assert schedules == {}
    export_safetensors(str(run), str(tmp_path / "model.safetensors"))
    exported, (loaded, _) = load_exported(str(tmp_path / "model.safetensors")), load_model_from_checkpoint(str(ckpt))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(exported.eval().encode_image(images), loaded.eval().encode_image(images), atol=1e-6)
