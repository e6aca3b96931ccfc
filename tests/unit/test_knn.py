"""Weighted kNN evaluation (dtp_ds.eval.knn): the vote against a brute-force numpy reference,
features of class-folder and cls-shard splits, and two gloo ranks against one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dtp_ds.cluster.ports import free_port
from dtp_ds.eval.classify import class_split
from dtp_ds.eval.knn import gather_rows, image_features, knn_classify, knn_eval

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16


def brute_force(bank: np.ndarray, bank_y: np.ndarray, q: np.ndarray, q_y: np.ndarray, classes: int, k: int,
                t: float) -> tuple[float, float]:
    """DINO's weighted vote, one query at a time, in float64."""
    top1 = top5 = 0
    for x, y in zip(q, q_y):
        sims = bank @ x
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(classes)
        for i in nearest:
            votes[bank_y[i]] += np.exp(sims[i] / t)
        ranked = [c for c in np.argsort(-votes, kind="stable")[:5] if votes[c] > 0]
        top1 += ranked[0] == y
        top5 += y in ranked
    return 100 * top1 / len(q), 100 * top5 / len(q)


@pytest.mark.parametrize("k,chunk", [(20, 7), (3, 1000), (500, 16)])
def test_knn_vote_matches_brute_force(k, chunk):
    rng = np.random.default_rng(k)
    classes = 9
    centres = rng.normal(size=(classes, 16))
    bank_y = rng.integers(0, classes, 200)
    q_y = rng.integers(0, classes, 61)
    bank = centres[bank_y] + 1.5 * rng.normal(size=(200, 16))
    q = centres[q_y] + 1.5 * rng.normal(size=(61, 16))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ref = brute_force(bank, bank_y, q, q_y, classes, min(k, 200), 0.07)
    f32 = torch.float32
    got = knn_classify(torch.tensor(bank, dtype=f32), torch.tensor(bank_y), torch.tensor(q, dtype=f32),
                       torch.tensor(q_y), classes, k=k, temperature=0.07, chunk=chunk)
    assert got == pytest.approx(ref, abs=1e-9)
    assert 100 / classes < ref[0] < 100  # neither chance nor trivial: the comparison can tell


class Tiny(nn.Module):
    """A fixed random embedding of 4x4-pooled pixels (an image trunk's interface: ``img_size``)."""

    img_size = (SIZE, SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 12)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(12, 48, generator=torch.Generator().manual_seed(0)))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(x, 4).flatten(1))


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    """Class folders c0..c2 of noisy solid-colour images (class = dominant channel)."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 90, (SIZE, SIZE, 3))
            px[..., c] += 160
            Image.fromarray(px.astype(np.uint8)).save(root / f"c{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("knn")
    return write_folder(root / "bank", 5, 0), write_folder(root / "query", 3, 1)  # 15 and 9 images


def test_image_features_are_the_normalised_embeddings_of_the_split(folders):
    model = Tiny()
    feats, labels = image_features(model, T.ToTensor(), class_split(str(folders[0])), torch.device("cpu"),
                                   batch_size=4, workers=0)
    assert feats.shape == (15, 12) and sorted(labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.allclose(feats.norm(dim=1), torch.ones(15), atol=1e-6)
    one = T.ToTensor()(Image.open(folders[0] / "c1" / "002.png").convert("RGB"))
    emb = F.normalize(model(one[None]), dim=1)[0]
    assert float((feats @ emb.detach()).max()) == pytest.approx(1.0, abs=1e-5)
    raw, _ = image_features(model, T.ToTensor(), class_split(str(folders[0])), torch.device("cpu"), workers=0,
                            normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(15))


def test_knn_eval_of_a_folder_split_and_cls_shards(folders, tmp_path):
    res = knn_eval(Tiny(), T.ToTensor(), class_split(str(folders[0])), class_split(str(folders[1])),
                   torch.device("cpu"), batch_size=4, workers=0, k=5)
    assert res["knn_images"] == 9 and res["knn_bank"] == 15 and res["knn_classes"] == 3
    assert res["knn_top1"] == pytest.approx(100.0) and res["knn_top5"] == pytest.approx(100.0)  # colour is easy
    from dtp_ds.data.synthetic import write_classify_split

    write_classify_split(tmp_path, num_train=112, samples_per_shard=56, val_per_class=1, image_size=SIZE, seed=0)
    shards = class_split(str(tmp_path / "classify" / "train" / "{00000..00001}.tar"))
    res = knn_eval(Tiny(), T.ToTensor(), shards, class_split(str(tmp_path / "classify" / "val")), torch.device("cpu"),
                   batch_size=32, workers=0)
    assert res["knn_bank"] == 112 and res["knn_classes"] == res["knn_images"] == 56


def _rank(rank: int, port: int, bank: str, query: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # batch 3: rank 0 has 2 query batches, rank 1 one (it runs a dummy to keep step)
        res = knn_eval(Tiny(), T.ToTensor(), class_split(bank), class_split(query), torch.device("cpu"),
                       batch_size=3, workers=0, k=4, temperature=0.5)
        rows = gather_rows(torch.arange(rank + 2))  # uneven row counts
        feats, labels = image_features(Tiny(), T.ToTensor(), class_split(bank), torch.device("cpu"), batch_size=3,
                                       workers=0)
        torch.save({"res": res, "rows": rows, "feats": feats, "labels": labels}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_one_rank_s_numbers(folders, tmp_path):
    out = str(tmp_path / "knn")
    mp.spawn(_rank, args=(free_port(), str(folders[0]), str(folders[1]), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    one = knn_eval(Tiny(), T.ToTensor(), class_split(str(folders[0])), class_split(str(folders[1])),
                   torch.device("cpu"), batch_size=3, workers=0, k=4, temperature=0.5)
    feats, labels = image_features(Tiny(), T.ToTensor(), class_split(str(folders[0])), torch.device("cpu"),
                                   batch_size=3, workers=0)
    for r in ranks:
        assert r["res"] == pytest.approx(one)
        assert r["rows"].tolist() == [0, 1, 0, 1, 2]
        assert torch.equal(r["labels"], labels)  # the same images in the same order
        assert torch.allclose(r["feats"], feats, atol=1e-6)
