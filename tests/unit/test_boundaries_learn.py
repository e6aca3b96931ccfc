"""DRIP learns where to cut: a short CPU CLIP training on the synthetic shapes (32 px, 8 x 8
patches) whose boundary-probability spread grows and whose segment purity beats evenly spaced
boundaries at the same count, evaluated under the rule evaluation always uses. A predictor that
outputs its prior everywhere (what the demo's model did) fails the same checks."""
from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from dtp_ds.data.synthetic import write_synthetic_dataset
from dtp_ds.eval.zeroshot import folder_split, zero_shot_eval
from dtp_ds.models import record_forward, register_config, registry, trunks

NAME = "DRIP-test-learns"
# the shipped tiny model's predictor (DRIP-ViT-Tiny-8-4x.json), at 32 px and a third of the depth
PREDICTOR = {"predictor": "cosine", "predictor_input": "embed", "selection": "topk", "tied": True}


def config(predictor: dict) -> dict:
    return {"embed_dim": 64,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 4,
                           "drip_cfg": {"pre": 1, "shorten": 2, "compression": 4, "stem": "conv", **predictor}},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor, Path]:
    out = tmp_path_factory.mktemp("shapes32")
    write_synthetic_dataset(out, num_train=2000, samples_per_shard=1000, val_per_class=4, image_size=32, seed=0)
    register_config(NAME, config(PREDICTOR))
    _, _, preprocess = open_clip.create_model_and_transforms(NAME)
    tokenizer = open_clip.get_tokenizer(NAME)
    images, captions = [], []
    for shard in sorted(glob.glob(str(out / "train" / "*.tar"))):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in files}):
            images.append(preprocess(Image.open(io.BytesIO(files[key + ".jpg"])).convert("RGB")))
            captions.append(files[key + ".txt"].decode())
    yield torch.stack(images), tokenizer(captions), out
    registry._REGISTERED.pop(NAME, None)
    open_clip.factory._MODEL_CONFIGS.pop(NAME, None)


def evaluate(model, out: Path) -> dict:
    _, _, preprocess = open_clip.create_model_and_transforms(NAME)
    return zero_shot_eval(model, open_clip.get_tokenizer(NAME), preprocess, folder_split(str(out / "zeroshot")),
                          torch.device("cpu"), batch_size=256)


def learned_where_to_cut(before: dict, after: dict) -> bool:
    return (after["zeroshot_prob_spread"] >= before["zeroshot_prob_spread"] + 0.2
            and after["zeroshot_purity"] > after["zeroshot_purity_even"] + 0.01
            and after["zeroshot_purity_by_patch"] > after["zeroshot_purity_by_patch_even"] + 0.01)


def test_short_training_learns_content_boundaries(shapes) -> None:
    images, texts, out = shapes
    torch.set_num_threads(1)
    register_config(NAME, config(PREDICTOR))
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, output_dict=True)
    before = evaluate(model, out)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(0)
    train_compression = []
    for _ in range(150):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        with record_forward() as rec:
            o = model(images[idx], texts[idx])
        aux = {**rec[0].aux_losses, **rec[0].stats}
        loss = loss_fn(o["image_features"], o["text_features"], o["logit_scale"]) + aux["boundary_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_compression.append(float(aux["compression"]))
    after = evaluate(model, out)
    summary = {k: (round(before[k], 3), round(after[k], 3)) for k in
               ("zeroshot_prob_spread", "zeroshot_purity", "zeroshot_purity_even", "zeroshot_purity_by_patch",
                "zeroshot_purity_by_patch_even", "zeroshot_compression")}
    print("before -> after:", summary)
    assert learned_where_to_cut(before, after), summary
    train = sum(train_compression[-20:]) / 20
    assert after["zeroshot_compression"] == pytest.approx(train, rel=0.15)
    assert after["zeroshot_top1"] > 2 * after["zeroshot_chance_top1"]  # and the CLIP itself learned


def test_a_predictor_at_its_prior_everywhere_fails_those_checks(shapes) -> None:
    """The demo's old model: an MLP whose output is the prior on every patch. Its spread stays
    near 0 and, under the threshold rule it was evaluated with, every image is one segment."""
    _, _, out = shapes
    register_config(NAME, config({"predictor": "mlp", "eval_rule": "threshold"}))
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, output_dict=True)
    pred = trunks(model)[0].reducer.boundary_predictor
    with torch.no_grad():
        pred.fc2.weight.zero_()  # logit(prior) everywhere
    flat = evaluate(model, out)
    assert flat["zeroshot_prob_spread"] < 0.01 and flat["zeroshot_compression"] == 64.0
    assert flat["zeroshot_purity"] == flat["zeroshot_purity_even"]
    assert not learned_where_to_cut(flat, flat)
    pred.eval_rule = "expected"  # at its training compression, still no better than chance
    assert not learned_where_to_cut(flat, evaluate(model, out))
    register_config(NAME, config(PREDICTOR))
