"""DRIP boundaries: evaluation rules at the training compression, the predictor variants, and
the boundary-quality figures (purity against evenly spaced boundaries, probability spread)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dtp_ds.data import synthetic as syn
from dtp_ds.eval.boundary_quality import BoundaryQuality, segment_purity_sums
from dtp_ds.models import VisionTransformer, expected_segments, record_forward
from dtp_ds.models.boundary import (
    EVAL_RULES,
    CosineBoundaryPredictor,
    FixedBoundaryPredictor,
    regular_boundaries,
    topk_boundaries,
)
from dtp_ds.models.reducers.drip import DripReducer
from dtp_ds.models.segments import segment_ids


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trunk(**kw) -> VisionTransformer:
    """32 px, 64 patches, width 32: DRIP blocks 1 (pre) + 2 (shorten); ``kw``: DRIP options."""
    torch.manual_seed(0)
    reducer = DripReducer(dim=32, depth=3, num_patches=64, pre=1, shorten=2, compression=4, **kw)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=16,
                             reducer=reducer)


def boundaries(model: VisionTransformer, images: torch.Tensor):
    """The DRIP Boundaries the model's forward pooled with (``TowerOutput.extras``)."""
    with record_forward() as rec, torch.no_grad():
        model(images)
    return rec[0].extras["boundaries"]


def compression(model: VisionTransformer, images: torch.Tensor, train: bool) -> float:
    model.train(train)
    with record_forward() as rec, torch.no_grad():
        model(images)
    return float(rec[0].stats["compression"])


def spread(model: VisionTransformer, scale: float) -> None:
    """Give the MLP predictor logits that vary with the token: std ``scale`` around the prior."""
    pred = model.reducer.boundary_predictor
    with torch.no_grad():
        pred.fc1.weight.normal_(0.0, 1.0)
        pred.fc2.weight.normal_(0.0, scale / pred.fc2.weight.shape[1] ** 0.5)


@pytest.mark.parametrize("rule", EVAL_RULES)
@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0])  # at the prior, spread, confident
def test_eval_rule_runs_at_training_compression(rule: str, scale: float) -> None:
    """Each rule's eval compression against the Gumbel-Sigmoid training compression (15%):
    ``expected`` and ``sample`` hold for any predictor; ``threshold`` only for a confident
    one: at the prior it collapses every image to one segment (the failure it had)."""
    if rule == "threshold" and scale == 1.0:
        # between the collapse and a confident predictor: over draws of the weights the gap
        # spans 2% to 36%, so 15% held for one draw only (the shared trunk draws in another order)
        pytest.skip("threshold is at the training compression only for a confident predictor")
    model = trunk(eval_rule=rule)
    spread(model, scale)
    images = torch.randn(256, 3, 32, 32)
    torch.manual_seed(1)
    train = compression(model, images, True)
    evald = compression(model, images, False)
    if rule == "threshold" and scale == 0.0:
        assert evald == pytest.approx(64.0)  # one segment per image: documented, not a rule to use
        return
    assert evald == pytest.approx(train, rel=0.15), (rule, scale, train, evald)


def test_expected_rule_takes_the_k_most_probable() -> None:
    probs = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.5, 0.5, 0.1, 0.9]])
    hard = topk_boundaries(probs, torch.tensor([2, 1]))
    assert hard.tolist() == [[0, 1, 0, 1, 0], [0, 0, 0, 0, 1]]
    model = trunk()
    spread(model, 1.0)
    model.eval()
    bnd = boundaries(model, torch.randn(8, 3, 32, 32))
    counts = (bnd.hard > 0.5).sum(-1)
    assert counts.tolist() == bnd.probs.sum(-1).round().long().tolist()
    # every chosen patch is at least as probable as every patch left out
    for p, h in zip(bnd.probs, bnd.hard > 0.5):
        if h.any() and (~h).any():
            assert p[h].min() >= p[~h].max()


def test_eval_rules_are_deterministic() -> None:
    images = torch.randn(16, 3, 32, 32)
    for rule in EVAL_RULES:
        model = trunk(eval_rule=rule)
        spread(model, 1.0)
        model.eval()
        with torch.no_grad():
            a, b = model(images), model(images)
        torch.testing.assert_close(a, b)


def test_cosine_router_is_the_same_in_training_and_evaluation() -> None:
    model = trunk(predictor="cosine")
    images = torch.randn(16, 3, 32, 32)
    caps = []
    for train in (True, False):
        model.train(train)
        caps.append(boundaries(model, images))
    torch.testing.assert_close(caps[0].hard, caps[1].hard)
    assert (caps[0].hard[:, -1] == 1).all()  # the sequence end closes the last segment


def test_cosine_router_cuts_where_content_changes_and_its_ratio_loss() -> None:
    pred = CosineBoundaryPredictor(8, prior=0.25)
    a, b = torch.randn(8), torch.randn(8)
    b = b - (b @ a) / (a @ a) * a - 0.5 * a  # cos(a, b) < 0
    x = torch.stack([a] * 5 + [b] * 3).unsqueeze(0)
    bnd = pred(x)
    assert (bnd.hard[0] > 0.5).tolist() == [False] * 4 + [True] + [False] * 2 + [True]
    # ratio loss: smallest (1) where the selected fraction and the mean probability equal the prior
    probs = torch.full((1, 9), 0.25, requires_grad=True)
    hard = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0, 1]])
    from dtp_ds.models.boundary import Boundaries

    loss = pred.rate_loss(Boundaries(torch.logit(probs), probs, hard))
    assert float(loss.detach()) == pytest.approx(1.0)
    too_many = pred.rate_loss(Boundaries(probs, probs, torch.ones(1, 9)))
    too_many.backward()
    assert probs.grad[0, :-1].sum() > 0  # more boundaries than the prior: the loss lowers them


def test_fixed_predictor_cuts_the_prior_segment_count() -> None:
    for length, prior in ((49, 0.1), (64, 0.25), (196, 0.5)):
        bnd = FixedBoundaryPredictor(prior)(torch.randn(3, length, 4))
        ids = segment_ids(bnd.hard)
        assert (ids[:, -1] + 1).tolist() == [round(expected_segments(length, prior))] * 3


def test_purity_tells_collapse_random_and_content_apart() -> None:
    grid = 8
    labels = np.zeros(grid * grid, dtype=bool)
    labels[2 * grid + 2:2 * grid + 6] = labels[3 * grid + 2:3 * grid + 6] = True  # a 2x4 shape
    lab = torch.as_tensor(labels)
    # content-following: a boundary wherever the label changes in raster order (and at the end)
    follow = torch.zeros(grid * grid)
    follow[:-1] = (lab[1:] != lab[:-1]).float()
    follow[-1] = 1
    pur, maj, n = segment_purity_sums(segment_ids(follow.unsqueeze(0))[0], lab)
    assert pur / n == 1.0 and maj == 64
    _, even, _ = segment_purity_sums(segment_ids(regular_boundaries(64, n).unsqueeze(0))[0], lab)
    assert even / 64 < 0.95
    q = BoundaryQuality()
    one = torch.zeros(1, 64, dtype=torch.long)
    q.add(one, torch.full((1, 64), 0.25), [labels])  # the collapse: one segment
    r = q.result()
    assert r["compression"] == 64 and r["purity"] == r["purity_even"] and r["prob_spread"] < 0.01
    q = BoundaryQuality()
    g = torch.Generator().manual_seed(0)
    for _ in range(500):  # random pooling at rate 0.25
        q.add(segment_ids((torch.rand(1, 64, generator=g) < 0.25).float()), torch.full((1, 64), 0.25), [labels])
    r = q.result()
    assert r["prob_spread"] < 0.01  # fails the spread
    # averaged over segments its one-patch segments win; weighted by patches it loses
    assert r["purity"] == pytest.approx(0.952, abs=0.001) and r["purity_even"] == pytest.approx(0.941, abs=0.001)
    assert r["purity_by_patch"] == pytest.approx(0.917, abs=0.001)
    assert r["purity_by_patch_even"] == pytest.approx(0.939, abs=0.001)
    assert r["boundary_rate"] == pytest.approx(0.25, abs=0.05)


def test_quality_of_any_grouping_does_not_depend_on_how_groups_are_numbered() -> None:
    """Another reducer's group ids need not be contiguous nor in raster order (DRIP's are)."""
    g = torch.Generator().manual_seed(0)
    ids = segment_ids((torch.rand(3, 64, generator=g) < 0.25).float())
    labels = [(torch.rand(64, generator=g) < 0.3).numpy() for _ in range(3)]
    a, b = BoundaryQuality(), BoundaryQuality()
    a.add(ids, None, labels)
    b.add((ids.max() - ids) * 5 + 11, None, labels)  # renamed and reversed
    assert a.result() == pytest.approx(b.result()) and "purity" in a.result()
    assert "prob_spread" not in a.result()  # no scores reported: no spread


def test_recorded_objects_rebuild_the_shape_mask() -> None:
    for index in range(40):
        jpg, _, meta = syn.make_train_sample(0, index, 64, distractor_prob=0.3, pair_prob=0.3)
        from io import BytesIO

        from PIL import Image

        img = np.asarray(Image.open(BytesIO(jpg)).convert("RGB"), dtype=float)
        mask = syn.object_mask(meta["objects"], 64)
        names = [meta["color"]] if meta["kind"] == "single" else [meta["left_color"], meta["right_color"]]
        near = np.zeros(mask.shape, dtype=bool)
        for c in names:
            near |= np.linalg.norm(img - np.asarray(syn.COLORS[c], float), axis=-1) < 60
        if meta["kind"] == "single" and meta.get("distractor"):
            near |= np.linalg.norm(img - np.asarray(syn.COLORS[meta["distractor"]["color"]], float), axis=-1) < 60
        inter, union = (mask & near).sum(), (mask | near).sum()
        assert inter / union > 0.8, (index, meta["kind"], inter / union)
        labels = syn.patch_labels(meta["objects"], 64, 8)
        assert labels.shape == (64,) and 0 < labels.sum() < 64


def test_one_rule_for_zeroshot_pictures_flops_and_run_dirs(tmp_path) -> None:
    """Zero-shot evaluation, tools/visualize_boundaries and tools/flops --boundary-rate RUN_DIR
    see the same boundaries: the ones the eval rule places on these images."""
    import json

    import open_clip

    from dtp_ds.eval.boundaries import extract_boundaries, val_transform
    from dtp_ds.eval.flops import count_flops
    from dtp_ds.eval.run_metrics import boundary_rate_arg
    from dtp_ds.eval.zeroshot import folder_split, zero_shot_eval

    syn.write_synthetic_dataset(tmp_path / "d", num_train=2, samples_per_shard=2, val_per_class=1, image_size=64)
    torch.manual_seed(0)
    model = open_clip.create_model("DRIP-ViT-Tiny-8-4x", output_dict=True)  # the shipped router
    model.train()
    split = folder_split(str(tmp_path / "d" / "zeroshot"))
    preprocess = val_transform(model)
    res = zero_shot_eval(model, open_clip.get_tokenizer("DRIP-ViT-Tiny-8-4x"), preprocess, split,
                         torch.device("cpu"), batch_size=16)
    assert model.training  # restored
    assert {"zeroshot_compression", "zeroshot_purity", "zeroshot_purity_even", "zeroshot_prob_spread",
            "zeroshot_boundary_rate"} <= set(res)
    from PIL import Image
    from torchvision.datasets import ImageFolder

    paths = [p for p, _ in ImageFolder(split.image_dir).samples]
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    drawn = extract_boundaries(model, images)
    patches = sum(b.num_patches for b in drawn)
    assert res["zeroshot_compression"] == pytest.approx(patches / sum(b.num_segments for b in drawn))
    # a run directory: an evaluation row, then a line torn by a kill mid-write
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "boundary_rate": 0.25}) + "\n"
                                       + json.dumps({"step": 5, **res}) + "\n" + '{"step": 6, "lo')
    rate = boundary_rate_arg(str(run))
    assert rate == res["zeroshot_boundary_rate"]
    counted = count_flops(model, (64, 64), boundary_rate=rate)
    assert counted["compression"] == pytest.approx(res["zeroshot_compression"], rel=1e-6)
    assert model.training  # count_flops restores the mode too


def test_cumsum_straight_through_gives_a_boundary_no_task_gradient() -> None:
    """The diagnosis behind the confidence-weighted path: through DTP's cumulative-sum
    weights, every segment after a patch contributes zero to its gradient (its members'
    deviations from their mean sum to zero), so a patch that is a boundary gets none at all."""
    from dtp_ds.models.boundary import confidence_weights
    from dtp_ds.models.segments import make_packing, pack_segments, straight_through_weights

    torch.manual_seed(0)
    length, dim = 16, 8
    x = torch.randn(1, 1 + length, dim, dtype=torch.float64)
    probs = torch.rand(1, length, dtype=torch.float64).requires_grad_()
    hard01 = torch.zeros(1, length, dtype=torch.float64)
    hard01[0, [2, 3, 7, 11, 15]] = 1
    hard = hard01 + probs - probs.detach()
    packing = make_packing(segment_ids(hard))
    target = torch.randn(packing.num_rows, dim, dtype=torch.float64)
    grads = {}
    for name, weights in (("cumsum", straight_through_weights(hard)), ("confidence", confidence_weights(probs, hard))):
        (grads[name],) = torch.autograd.grad((pack_segments(x, packing, weights) * target).sum(), probs)
    at_boundary = hard01[0] > 0.5
    assert grads["cumsum"][0, at_boundary].abs().max() < 1e-12
    assert grads["cumsum"][0, ~at_boundary].abs().max() > 1e-3
    # H-Net's weights reach every boundary whose segment has more than that one patch (3 is alone)
    assert (grads["confidence"][0, [2, 7, 11, 15]].abs() > 1e-6).all()


def test_demo_prints_the_boundaries_as_evaluation_placed_them(tmp_path) -> None:
    import json
    import re

    from dtp_ds.train.runs import summary_lines

    # the count line's figures come from BoundaryQuality as evaluation accumulates them: three
    # images of 16 patches cut into 2, 4 and 6 segments (mean 4, population std sqrt(8/3))
    quality = BoundaryQuality()
    # and the busier the image, the more segments: flat, one step, a checkerboard of 4x4 (x 10)
    images = torch.zeros(3, 3, 16, 16)
    images[1, :, :, 8:] = 1.0
    images[2] = ((torch.arange(16)[:, None] // 4 + torch.arange(16)[None, :] // 4) % 2).float()
    for _ in range(10):
        quality.add(torch.tensor([[0] * 8 + [1] * 8, [0, 1, 2, 3] * 4, [0, 1, 2, 3, 4, 5] * 2 + [5] * 4]), None,
                    [None] * 3, images)
    counts = quality.result("zeroshot_")
    assert counts["zeroshot_segments_edges_r"] > 0.9 and counts["zeroshot_segments_edges_r_lo"] > 0.5
    row = {"step": 237, "zeroshot_top1": 30.0, "zeroshot_top5": 90.0, "zeroshot_chance_top1": 100 / 48,
           "zeroshot_classes": 48, **counts, "train_compression": 3.6,
           "zeroshot_purity": 0.95, "zeroshot_purity_even": 0.92, "zeroshot_prob_spread": 0.9,
           "layout_top1": 5.0, "layout_chance_top1": 100 / 30, "layout_classes": 30}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    lines = summary_lines(str(tmp_path / "metrics.jsonl"))
    assert "purity 0.950 vs 0.920" in lines[0] and "spread (q95 - q05) 0.900" in lines[0]
    assert lines[1].startswith("demo: layout split: top-1 5.0% = 1.5x chance")
    assert lines[2].startswith("demo: zero-shot top-1 30.0% = 14.4x chance")
    # the last two lines parse back to the figures (the demo's closing check of issue 23)
    count = re.fullmatch(r"demo: DRIP segments per image on the zero-shot split: mean ([\d.]+), std ([\d.]+), "
                         r"std/mean ([\d.]+) \(issue 23 target >= 0\.15\)", lines[-3])
    assert count, lines[-3]
    assert [float(v) for v in count.groups()] == pytest.approx([4.0, 1.6, 0.41], abs=0.01)
    follows = re.fullmatch(r"demo: DRIP segments per image against scene complexity \(95% interval over images\): "
                           r"with edge density r ([\d.-]+) \[([\d.-]+), ([\d.-]+)\] \(issue 23 target: r > 0, "
                           r"interval above 0\)", lines[-2])
    assert follows, lines[-2]
    assert [float(v) for v in follows.groups()] == pytest.approx(
        [counts[f"zeroshot_segments_edges_r{k}"] for k in ("", "_lo", "_hi")], abs=0.005)
    gap = re.fullmatch(r"demo: eval compression ([\d.]+) vs training ([\d.]+): (\d+)% apart "
                       r"\(issue 23 target within 15%\)", lines[-1])
    assert gap, lines[-1]
    assert [float(v) for v in gap.groups()] == pytest.approx([4.0, 3.6, 11], abs=0.005)


def test_tied_router_never_cuts_between_identical_neighbours() -> None:
    """With one projection for both sides, p = 0 between identical tokens whatever was learned:
    a uniform background stays one segment (separate projections learned to chop it up)."""
    pred = CosineBoundaryPredictor(8, prior=0.25, selection="topk", tied=True)
    with torch.no_grad():
        pred.q.weight.normal_()  # any learned projection
    a, b = torch.randn(8), torch.randn(8)
    x = torch.stack([a] * 6 + [b] * 6 + [a] * 4).unsqueeze(0)
    bnd = pred(x)
    assert torch.allclose(bnd.probs[0, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14]],
                          torch.full((13,), 1e-4), atol=1e-6)
    cut = (bnd.hard[0] > 0.5).nonzero().flatten().tolist()
    assert {5, 11, 15} <= set(cut)  # the two changes, and the sequence end
    assert sum(p.numel() for p in pred.parameters()) == 64  # one 8 x 8 projection
