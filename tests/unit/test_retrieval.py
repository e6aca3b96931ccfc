"""Image-text retrieval (dtp_ds.eval.retrieval): recall@K both ways on WebDataset shards with
several captions per image, checked against a brute-force numpy ranking; captions from
newline-separated ``txt`` or a ``json`` "captions" list; unusable samples counted."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import dtp_ds  # noqa: F401  (registers the dtp_ds model names with open_clip)
from dtp_ds.data.synthetic import make_train_sample
from dtp_ds.eval.boundaries import val_transform
from dtp_ds.eval.retrieval import captions_of, encode_set, recall_at_k, retrieval_eval, retrieval_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KS = (1, 5, 10)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_caption_shards(out: Path, shards: int = 3, per_shard: int = 4, json_shards: tuple[int, ...] = (2,),
                         broken: tuple[int, ...] = ()) -> list[tuple[bytes, list[str]]]:
    """``shards`` tars of synthetic 64 px images with two captions each (the sample's caption
    and "a photo of the <colour> <shape>"): newline-separated in ``txt``, or, in the shards of
    ``json_shards``, a json "captions" list (their ``txt`` holds a decoy caption that must not be
    read). Samples whose global index is in ``broken`` have no caption at all. Returns each
    sample's (jpg, captions) in order."""
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                index = s * per_shard + j
                jpg, text, meta = make_train_sample(seed=7, index=index, image_size=64, pair_prob=0.0)
                caps = [text, f"a photo of the {meta['classname']}"]
                key = f"{index:09d}"
                _add(tar, f"{key}.jpg", jpg)
                if index in broken:
                    samples.append((jpg, []))
                    continue
                if s in json_shards:
                    _add(tar, f"{key}.txt", b"a decoy caption")
                    _add(tar, f"{key}.json", json.dumps({"key": key, "captions": caps}).encode())
                else:
                    _add(tar, f"{key}.txt", "\n".join(caps).encode())
                samples.append((jpg, caps))
    return samples


def _brute_force(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray) -> dict[str, float]:
    """Recall@K by sorting every row's scores (numpy, nothing shared with the code under test)."""
    scores = images @ texts.T
    out = {}
    for k in KS:
        i2t = [np.isin(np.argsort(-scores[i], kind="stable")[:k], np.flatnonzero(text_image == i)).any()
               for i in range(len(images))]
        t2i = [text_image[t] in np.argsort(-scores[:, t], kind="stable")[:k] for t in range(len(texts))]
        out[f"image_to_text_r{k}"] = 100 * int(np.sum(i2t)) / len(images)  # (hit counts: compared exactly)
        out[f"text_to_image_r{k}"] = 100 * int(np.sum(t2i)) / len(texts)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return open_clip.create_model("DRIP-ViT-Tiny-8-4x").eval()


def test_recalls_on_multi_caption_shards_match_brute_force(tmp_path, model):
    samples = write_caption_shards(tmp_path / "shards")
    tok = open_clip.get_tokenizer("DRIP-ViT-Tiny-8-4x")
    preprocess = val_transform(model)
    rset = retrieval_set(str(tmp_path / "shards" / "{00000..00002}.tar"))
    feats = encode_set(model, tok, preprocess, rset, torch.device("cpu"), batch_size=5, workers=0)
    # every image with both its captions, in order (txt lines and json lists alike)
    assert len(feats.images) == 12 and len(feats.texts) == 24 and feats.unusable == 0
    assert feats.text_image.tolist() == [i for i in range(12) for _ in range(2)]
    # the features are the model's own embeddings of those images and captions
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(jpg)).convert("RGB")) for jpg, _ in samples])
        want_i = model.encode_image(images, normalize=True)
        want_t = model.encode_text(tok([c for _, caps in samples for c in caps]), normalize=True)
    assert torch.allclose(feats.images, want_i, atol=1e-5) and torch.allclose(feats.texts, want_t, atol=1e-5)

    got = recall_at_k(feats.images, feats.texts, feats.text_image, KS)
    want = _brute_force(feats.images.numpy(), feats.texts.numpy(), feats.text_image.numpy())
    assert {k: got[k] for k in want} == want
    assert got["mean_recall"] == pytest.approx(np.mean(list(want.values())))
    assert got["image_to_text_r10"] >= got["image_to_text_r5"] >= got["image_to_text_r1"]
    # chunked scoring changes nothing
    assert recall_at_k(feats.images, feats.texts, feats.text_image, KS, chunk=5) == got

    # the whole evaluation: same numbers, sizes, and DRIP's compression on the retrieval images
    res = retrieval_eval(model, tok, preprocess, rset, torch.device("cpu"), batch_size=5, workers=2)
    assert {k: res["retrieval_" + k] for k in want} == want
    assert res["retrieval_images"] == 12 and res["retrieval_texts"] == 24 and res["retrieval_unusable"] == 0
    assert res["retrieval_compression"] > 1


def test_recall_at_k_on_known_rankings():
    # 3 images, captions 0,1 -> image 0, 2 -> image 1, 3 -> image 2; caption 3 is closest to image 0
    images = torch.eye(3, 4)
    texts = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0], [0.8, 0, 0.6, 0]])
    text_image = torch.tensor([0, 0, 1, 2])
    r = recall_at_k(images, texts, text_image, ks=(1, 2, 10))
    # image->text: image 0's best is caption 0 (hit), image 1's caption 2 (hit), image 2's caption 3 (hit)
    assert r["image_to_text_r1"] == 100.0
    # text->image: caption 3 ranks image 0 (0.8) over image 2 (0.6): a miss at 1, a hit at 2
    assert r["text_to_image_r1"] == 75.0 and r["text_to_image_r2"] == 100.0
    assert r["text_to_image_r10"] == 100.0  # K past the candidates counts them all


def test_captions_come_from_the_json_list_else_the_txt_lines():
    assert captions_of({"txt": b"one\n\n two \n"}) == ["one", "two"]
    assert captions_of({"txt": b"decoy", "json": json.dumps({"captions": ["a", "b"]}).encode()}) == ["a", "b"]
    # an img2dataset json (no "captions") leaves the txt in charge
    assert captions_of({"txt": b"x", "json": json.dumps({"caption": "x", "url": None}).encode()}) == ["x"]


def test_unusable_samples_are_counted_and_left_out(tmp_path, model):
    write_caption_shards(tmp_path / "shards", shards=2, per_shard=3, json_shards=(), broken=(1, 4))
    tok = open_clip.get_tokenizer("DRIP-ViT-Tiny-8-4x")
    res = retrieval_eval(model, tok, val_transform(model), retrieval_set(str(tmp_path / "shards")),
                         torch.device("cpu"), batch_size=4, workers=0)
    assert res["retrieval_images"] == 4 and res["retrieval_texts"] == 8 and res["retrieval_unusable"] == 2
