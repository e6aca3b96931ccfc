"""The CA-MSE schedule estimator (tools/seqcomp_schedule) and the cost table
(tools/seqcomp_costs): known squared bias and variance recovered on a synthetic problem,
running sums against a direct computation, the chooser's one-SE tie rule and --monotone, the
written schedule through train/seqcomp_schedule.py's parser, and small end-to-end runs on a tiny
model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dtp_ds.models.seqcomp import NONE, SeqComp
from dtp_ds.seqcomp.camse import (
    Candidate,
    Moments,
    choose,
    choose_all,
    param_group,
    schedule_segments,
)
from dtp_ds.train.seqcomp_schedule import load_schedule


def _quadratic_grads(k: int, p: int, bias: torch.Tensor, noise: float, gen: torch.Generator, batch: int = 16):
    """Quadratic loss 0.5 ||w - x||^2 at w = 0, x ~ N(mu, I): the minibatch gradient over
    ``batch`` samples is -mean(x), covariance I / batch (trace p / batch). The "strategy" sees
    each sample shifted by ``-bias`` and with extra N(0, noise^2 I) noise: its gradient has
    bias ``bias`` and covariance (1 + noise^2) I / batch."""
    mu = torch.linspace(-1, 1, p, dtype=torch.float64)
    for _ in range(k):
        x = mu + torch.randn(batch, p, generator=gen, dtype=torch.float64)
        xs = x - bias + noise * torch.randn(batch, p, generator=gen, dtype=torch.float64)
        yield -x.mean(0), -xs.mean(0)


def test_known_bias_and_variance_are_recovered():
    p, batch, k, noise = 20, 16, 4000, 1.0
    bias = torch.full((p,), 0.05, dtype=torch.float64)  # ||b||^2 = 0.05
    gen = torch.Generator().manual_seed(0)
    ident, comp = Moments({"all": p}), Moments({"all": p})
    for i, (g0, gs) in enumerate(_quadratic_grads(k, p, bias, noise, gen, batch)):
        ident.add({"all": g0}, {"all": g0}, i)
        comp.add({"all": gs}, {"all": g0}, i)
    e0, es = ident.estimate(1.0)["total"], comp.estimate(1.0)["total"]
    # identity: no bias, exactly; its variance: tr(I) / batch
    assert e0["bias2"] == 0.0 and e0["bias2_raw"] == 0.0
    assert e0["var"] == pytest.approx(p / batch, rel=0.05)
    assert es["bias2"] == pytest.approx(float(bias.dot(bias)), rel=0.1)
    assert es["var"] == pytest.approx(p * (1 + noise**2) / batch, rel=0.05)
    assert es["camse"] == pytest.approx(es["bias2"] + es["var"])
    # doubling the cost doubles the cost-adjusted variance (and leaves the bias)
    e2 = comp.estimate(2.0)["total"]
    assert e2["cost_var"] == pytest.approx(2 * es["cost_var"]) and e2["bias2"] == es["bias2"]
    assert e2["camse"] == pytest.approx(es["bias2"] + 2 * es["var"])


def test_the_finite_k_debiasing_removes_the_noise_floor():
    """No true bias, only noise: ||mean d||^2 averages tr Cov(d) / K > 0; the debiased one ~0."""
    p, batch, k, noise = 10, 4, 8, 1.0
    gen = torch.Generator().manual_seed(1)
    raw, debiased = [], []
    for _ in range(400):
        m = Moments({"all": p})
        for i, (g0, gs) in enumerate(_quadratic_grads(k, p, torch.zeros(p, dtype=torch.float64), noise, gen, batch)):
            m.add({"all": gs}, {"all": g0}, i)
        t = m.estimate(1.0)["total"]
        raw.append(t["bias2_raw"])
        debiased.append(t["bias2"])
    floor = p * noise**2 / batch / k  # tr Cov(d) / K
    assert sum(raw) / len(raw) == pytest.approx(floor, rel=0.15)
    assert abs(sum(debiased) / len(debiased)) < 0.1 * floor


def test_running_sums_match_a_direct_computation():
    gen = torch.Generator().manual_seed(2)
    k, sizes = 6, {"image": 5, "text": 3}
    g0 = {g: torch.randn(k, n, generator=gen, dtype=torch.float64) for g, n in sizes.items()}
    gs = {g: g0[g] + 0.3 + torch.randn(k, n, generator=gen, dtype=torch.float64) for g, n in sizes.items()}
    m = Moments(sizes, replicates=2)
    for i in range(k):
        m.add({g: gs[g][i] for g in sizes}, {g: g0[g][i] for g in sizes}, i)
    cost = 0.4
    est = m.estimate(cost)
    total = {"bias2": 0.0, "var": 0.0}
    for g in sizes:
        d = gs[g] - g0[g]
        var = float(torch.cov(gs[g].T).trace()) if sizes[g] > 1 else float(gs[g].var())
        bias2 = float(d.mean(0).square().sum()) - float(torch.cov(d.T).trace()) / k
        assert est[g]["var"] == pytest.approx(var, rel=1e-9)
        assert est[g]["bias2"] == pytest.approx(bias2, rel=1e-9)
        assert est[g]["cost_var"] == pytest.approx(cost * var, rel=1e-9)
        total["bias2"] += bias2
        total["var"] += var
    assert est["total"]["camse"] == pytest.approx(total["bias2"] + cost * total["var"], rel=1e-9)
    # the standard error: the spread of the two replicates' (3 batches each) estimates
    reps = []
    for j in range(2):
        mj = Moments(sizes)
        for i in range(j, k, 2):
            mj.add({g: gs[g][i] for g in sizes}, {g: g0[g][i] for g in sizes}, i)
        reps.append(mj.estimate(cost)["total"]["camse"])
    assert est["total"]["se"] == pytest.approx(abs(reps[0] - reps[1]) / 2, rel=1e-9)


def test_parameter_groups():
    assert param_group("logit_scale") == "logit_scale"
    assert param_group("visual.trunk.reducer.predictor.0.weight") == "reducer"
    assert param_group("visual.trunk.blocks.0.attn.qkv.weight") == "image"
    assert param_group("transformer.resblocks.0.attn.in_proj_weight") == "text"
    assert param_group("text_projection") == "text"


def _c(r: float, cost: float, camse: float, se: float = float("nan")) -> Candidate:
    return Candidate(SeqComp(r), cost, camse, se)


def test_the_least_camse_wins_and_ties_go_to_the_mildest_strategy():
    none, half, most = _c(0.0, 1.0, 10.0, 1.0), _c(0.5, 0.6, 5.0, 1.0), _c(0.75, 0.4, 4.5, 1.0)
    # 4.5 is least; 5.0 is within its one standard error (1.0): the tie goes to the mildest strategy
    assert choose([none, half, most]).strategy.rate == 0.5
    # a clear winner (beyond one SE) stays
    assert choose([none, half, _c(0.75, 0.4, 3.0, 1.0)]).strategy.rate == 0.75
    # no standard error: the least wins
    assert choose([_c(0.0, 1.0, 5.0), _c(0.5, 0.6, 4.99)]).strategy.rate == 0.5


def test_monotone_forbids_a_cheaper_strategy_later():
    stages = [[_c(0.0, 1.0, 10.0), _c(0.5, 0.6, 5.0), _c(0.75, 0.4, 8.0)],
              [_c(0.0, 1.0, 3.0), _c(0.5, 0.6, 4.0), _c(0.75, 0.4, 6.0)],
              [_c(0.0, 1.0, 9.0), _c(0.5, 0.6, 5.0), _c(0.75, 0.4, 2.0)]]
    free = [c.strategy.rate for c in choose_all(stages)]
    assert free == [0.5, 0.0, 0.75]
    mono = [c.strategy.rate for c in choose_all(stages, monotone=True)]
    assert mono == [0.5, 0.0, 0.0]


def test_the_written_schedule_round_trips_through_the_parser(tmp_path):
    chosen = [_c(0.75, 0.4, 1), _c(0.5, 0.6, 1), _c(0.5, 0.6, 1), _c(0.25, 0.8, 1), _c(0.0, 1.0, 1)]
    segs = schedule_segments([0.0, 0.25, 0.5, 0.75, 1.0], chosen, final_fraction=0.1)
    assert [(s["fraction"], s["r"]) for s in segs] == [(0.25, 0.75), (0.5, 0.5), (0.15, 0.25)]
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"segments": segs, "stages": [], "model": "x"}))
    parsed = load_schedule(str(path))
    assert [s.describe() for s in parsed] == ["0.25:r=0.75,cost=0.4", "0.5:r=0.5,cost=0.6", "0.15:r=0.25,cost=0.8",
                                              "0.1:none"]
    assert math.isclose(sum(s.fraction for s in parsed), 1.0)
    # --final-fraction 0: the last stage's choice runs to the end (the fractions sum to 1)
    segs = schedule_segments([0.0, 0.5, 1.0], [_c(0.5, 0.6, 1), _c(0.25, 0.8, 1), _c(0.0, 1.0, 1)], 0.0)
    path.write_text(json.dumps({"segments": segs}))
    assert [s.describe() for s in load_schedule(str(path))] == ["0.5:r=0.5,cost=0.6", "0.5:r=0.25,cost=0.8"]
    # stages at 0 and 0.5 of a pilot that ended later (fractions < 1): the last stage runs on
    segs = schedule_segments([0.0, 0.5], [_c(0.5, 0.6, 1), _c(0.25, 0.8, 1)], 0.2)
    assert [(s["fraction"], s["r"]) for s in segs] == [(0.5, 0.5), (0.3, 0.25)]


def test_seqcomp_costs_writes_sane_json(tmp_path):
    from dtp_ds.seqcomp.costs import cost_of, load_costs, main

    out = tmp_path / "costs.json"
    assert main(["--model", "PatchStem-ViT-Tiny-8", "--rates", "0", "0.5", "0.75", "--patches", "stored", "16",
                 "--batch-size", "4", "--warmup", "0", "--steps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["r"], r["p"]): r for r in data["strategies"]}
    assert set(rows) == {(0.0, 8), (0.5, 8), (0.75, 8), (0.0, 16), (0.5, 16), (0.75, 16)}
    assert rows[(0.0, 8)]["cost"] == 1.0
    for r in rows.values():  # timings: sanity only (the machine is shared and noisy)
        for k in ("step_s", "per_sample_s", "step_per_forward", "cost", "gflops_step", "flops_cost"):
            assert r[k] > 0 and math.isfinite(r[k]), (k, r)
    # FLOPs are exact: they fall with r and with p (the text tower keeps them above the image tower's share)
    assert rows[(0.0, 8)]["flops_cost"] == 1.0 > rows[(0.5, 8)]["flops_cost"] > rows[(0.75, 8)]["flops_cost"]
    assert rows[(0.0, 8)]["flops_cost"] > rows[(0.0, 16)]["flops_cost"] > rows[(0.5, 16)]["flops_cost"]
    assert rows[(0.5, 8)]["flops_cost"] > rows[(0.5, 8)]["image_tower_flops_est"]
    table = load_costs(str(out))
    assert cost_of(table, NONE, 8) == 1.0 and cost_of(table, SeqComp(0.0, 8), 8) == 1.0
    assert cost_of(table, SeqComp(0.5, 16), 8) == rows[(0.5, 16)]["cost"]
    assert cost_of(table, SeqComp(0.3), 8) is None


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    from dtp_ds.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("small_synth")
    write_synthetic_dataset(out, num_train=64, samples_per_shard=32, val_per_class=1, image_size=64, seed=0)
    return out


def test_the_estimator_runs_end_to_end_on_a_tiny_checkpoint(small_synth, tmp_path):
    """Stage 0: a fresh model; stage 1: a model saved through the export path (a few SGD steps
    on the CLIP loss first, so the two stages differ)."""
    from safetensors.torch import save_file

    import dtp_ds
    from dtp_ds.models import get_model_config
    from dtp_ds.seqcomp.camse import run, write_outputs
    from dtp_ds.tasks.clip import CLIPModule
    from dtp_ds.train.export import exportable_state

    name = "PatchStem-ViT-Tiny-8"
    torch.manual_seed(0)
    model = dtp_ds.create_model(name, output_dict=True, nonscalar_logit_scale=True)
    module = CLIPModule(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        batch = {"image": torch.randn(8, 3, 64, 64), "text": torch.randint(1, 400, (8, model.context_length))}
        module(batch)["loss"].backward()
        opt.step()
    file = tmp_path / "step2.safetensors"
    save_file(exportable_state(model), str(file),
              metadata={"format": "pt", "model_name": name, "model_cfg": json.dumps(get_model_config(name)),
                        "step": "2"})
    result = run([f"init:{name}", str(file)], f"{small_synth}/train/{{00000..00001}}.tar",
                 [NONE, SeqComp(0.5), SeqComp(0.0, 16)], global_batch=8, batches=4,
                 fractions=[0.0, 0.5], progress=False, final_fraction=0.1)
    files = write_outputs(result, str(tmp_path / "out" / "schedule.json"))
    assert all((tmp_path / "out" / f).stat().st_size > 0 for f in ("schedule.json", "schedule.md", "schedule.png"))
    assert [st["step"] for st in result["stages"]] == [0, 2]
    for st in result["stages"]:
        rows = {r["strategy"]: r for r in st["strategies"]}
        assert set(rows) == {"none", "r=0.5", "p=16"}
        assert rows["none"]["groups"]["total"]["bias2"] == 0.0
        assert sum(r["chosen"] for r in rows.values()) == 1
        for r in rows.values():
            assert set(r["groups"]) == {"image", "text", "logit_scale", "total"}
            t = r["groups"]["total"]
            assert t["var"] > 0 and math.isfinite(t["camse"]) and math.isfinite(t["se"])
            # no cost table: the image tower's FLOP estimate, said so
            assert r["cost_source"] == ("identity" if r["strategy"] == "none" else "flops_est")
        # seqcomp changes only what the image tower sees: the logit scale's and text tower's gradients
        # move through the features, but an unbiased text tower is not expected; the image tower's bias is > 0
        assert rows["p=16"]["groups"]["image"]["bias2_raw"] > 0
    segs = load_schedule(files[0])
    assert math.isclose(sum(s.fraction for s in segs), 1.0) and segs[-1].strategy == NONE


def test_a_token_reducers_parameters_are_their_own_group():
    """DRIP (boundary predictor in the trunk's reducer) under token dropout: the reducer's
    parameters are reported apart, and the identity strategy has no bias in any group."""
    import dtp_ds
    from dtp_ds.seqcomp.camse import estimate_stage
    from dtp_ds.tasks.clip import CLIPModule

    torch.manual_seed(0)
    model = dtp_ds.create_model("DRIP-ViT-Tiny-8-4x", output_dict=True, nonscalar_logit_scale=True)
    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(6, 3, 64, 64, generator=gen),
                "text": torch.randint(1, 400, (6, model.context_length), generator=gen)} for _ in range(3)]
    none, half = estimate_stage(CLIPModule(model), [NONE, SeqComp(0.5)], [1.0, 0.6], batches)
    assert set(none) == {"image", "text", "logit_scale", "reducer", "total"}
    assert all(none[g]["bias2"] == 0.0 for g in none)
    assert half["reducer"]["var"] > 0 and half["reducer"]["bias2_raw"] > 0
    assert half["total"]["cost_var"] == pytest.approx(0.6 * half["total"]["var"])


def test_seqcomp_costs_fill_the_schedules_segments(tmp_path):
    """``--seqcomp-costs``: a segment without a cost takes its measured one (p = the table
    model's patch is the stored patch); a given cost stays; a missing strategy is refused."""
    from dtp_ds.train.seqcomp_schedule import parse_spec, with_costs

    table = tmp_path / "costs.json"
    table.write_text(json.dumps({"patch_size": 8, "strategies": [
        {"r": 0.0, "p": 8, "cost": 1.0}, {"r": 0.5, "p": 8, "cost": 0.7}, {"r": 0.5, "p": 16, "cost": 0.41}]}))
    segs = with_costs(parse_spec("0.3:r=0.5,p=16;0.2:r=0.5;0.2:r=0.5,p=8;0.1:r=0.5,cost=0.9"), str(table))
    assert [s.cost for s in segs] == [0.41, 0.7, 0.7, 0.9, 1.0]
    assert [s.describe() for s in segs][-1] == "0.2:cost=1"
    with pytest.raises(ValueError, match=r"no measured cost for r=0\.25 \(it has: none, r=0\.5, r=0\.5,p=16\)"):
        with_costs(parse_spec("0.5:r=0.25"), str(table))


def test_bench_seqcomp_time_to_the_baselines_accuracy():
    """The benchmark's arithmetic: target = the baseline's final top-1, each arm's time to its first
    evaluation at or above it, over the baseline's own time to it (which may be before its end)."""
    from dtp_ds.seqcomp.bench import Arm, summarize, time_to

    def points(*pairs):
        return [{"step": 10 * (i + 1), "time_s": t, "top1": a, "top5": 0.0} for i, (t, a) in enumerate(pairs)]

    base = Arm("baseline", "", curve=points((10, 5.0), (20, 12.0), (30, 11.0)), steps=30, train_time_s=30.0)
    fast = Arm("dropout", "1:r=0.5", 0.7, curve=points((7, 6.0), (14, 11.5), (21, 13.0)), steps=43, train_time_s=30)
    never = Arm("patch", "1:p=16", 0.5, curve=points((5, 3.0), (10, 9.0)), steps=60, train_time_s=30.0)
    assert time_to(base.curve, 11.0) == 20 and time_to(never.curve, 11.0) is None
    result = summarize([base, fast, never])
    rows = {r["arm"]: r for r in result["rows"]}
    assert result["target_top1"] == 11.0 and result["baseline_time_to_target_s"] == 20
    assert rows["baseline"]["ratio"] == 1.0 and rows["dropout"]["ratio"] == pytest.approx(14 / 20)
    assert rows["patch"]["ratio"] is None and rows["patch"]["best_top1"] == 9.0


def test_seqcomp_costs_time_an_ssl_tasks_own_step(tmp_path):
    """``--task mocov3``: the step timed is MoCo v3's (both views through the student and the momentum
    encoder, the task's own flags passed through); seqcomp on every trunk costs less than the
    full-sequence step, in FLOPs and in CPU time; another task's flag is refused by name."""
    from dtp_ds.seqcomp.costs import main

    out = tmp_path / "costs.json"
    common = ["--task", "mocov3", "--model", "PatchStem-ViT-Tiny-8", "--batch-size", "4", "--clock", "cpu",
              "--moco-mlp-dim", "64", "--moco-dim", "32", "--out", str(out)]
    assert main([*common, "--rates", "0", "0.75", "--patches", "stored", "16", "--warmup", "1", "--steps", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["task"] == "mocov3" and data["model"] == "PatchStem-ViT-Tiny-8"
    rows = {(r["r"], r["p"]): r for r in data["strategies"]}
    assert rows[(0.0, 8)]["cost"] == 1.0 == rows[(0.0, 8)]["flops_cost"]
    for key in ((0.75, 8), (0.0, 16), (0.75, 16)):
        assert 0 < rows[key]["flops_cost"] < 0.5 and 0 < rows[key]["cost"] < 1.0, rows[key]
    with pytest.raises(SystemExit):
        main([*common, "--rates", "0", "--num-classes", "3"])


def _tiny_ssl(task: str, seed: int = 0):
    from dtp_ds.seqcomp.costs import task_config
    from dtp_ds.tasks import TaskSpec, build_task

    flags = {"mocov3": ["--moco-mlp-dim", "64", "--moco-dim", "32"], "simclr": ["--simclr-mlp-dim", "64"],
             "dino": ["--dino-out-dim", "64"]}[task]
    torch.manual_seed(seed)
    return build_task(task, TaskSpec("ViT-Tiny-8", config=task_config(task, flags)))


@pytest.mark.parametrize("task", ["mocov3", "simclr", "dino"])
def test_the_paired_gradients_of_a_two_view_loss_are_exact(task):
    """Same batch (the same two views), same seed: the full-sequence gradient is reproduced bit for bit
    (r = 0 is the full-sequence gradient; the module's buffers, BatchNorm statistics and DINO's centre,
    are restored after each), and so is a seqcomp one; the momentum encoder has no gradient."""
    from dtp_ds.seqcomp.camse import GradientProbe

    built = _tiny_ssl(task)
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.randn(4, 3, 64, 64, generator=gen) for k in built.batch_keys}
    probe = GradientProbe(built.module)
    assert set(probe.sizes) == {"image", "head"}
    assert not any(n.startswith("teacher.") for n in probe.groups)
    buffers = {n: b.clone() for n, b in built.module.named_buffers()}
    g0 = probe.grads(NONE, batch, 3)
    assert all(torch.equal(b, buffers[n]) for n, b in built.module.named_buffers())
    for s in (SeqComp(0.0), NONE):
        assert all(torch.equal(g0[k], v) for k, v in probe.grads(s, batch, 3).items())
    g1, g2 = probe.grads(SeqComp(0.5), batch, 3), probe.grads(SeqComp(0.5), batch, 3)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(g0["image"], g1["image"])


def test_the_estimator_runs_on_mocov3_from_a_fresh_model(small_synth):
    """``tools/seqcomp_schedule --task mocov3 --checkpoints init:ViT-Tiny-8``: two batches of the
    task's two views from the shards; the full-sequence strategy has no bias in any group, token
    dropout has some in the trunk's gradient."""
    from dtp_ds.seqcomp.camse import main, run
    from dtp_ds.seqcomp.costs import task_config

    result = run(["init:ViT-Tiny-8"], f"{small_synth}/train/{{00000..00001}}.tar", [NONE, SeqComp(0.5)],
                 global_batch=8, batches=2, fractions=[0.0], progress=False, task="mocov3",
                 config=task_config("mocov3", ["--moco-mlp-dim", "64", "--moco-dim", "32"]))
    assert result["task"] == "mocov3" and result["model"] == "ViT-Tiny-8"
    (stage,) = result["stages"]
    rows = {r["strategy"]: r for r in stage["strategies"]}
    assert set(rows) == {"none", "r=0.5"}
    for r in rows.values():
        assert set(r["groups"]) == {"image", "head", "total"}
        assert r["groups"]["total"]["var"] > 0 and math.isfinite(r["groups"]["total"]["camse"])
    assert all(rows["none"]["groups"][g]["bias2"] == 0.0 == rows["none"]["groups"][g]["bias2_raw"]
               for g in rows["none"]["groups"])
    assert rows["r=0.5"]["groups"]["image"]["bias2_raw"] > 0
    # a flag of another task is refused by name, before anything is read
    with pytest.raises(SystemExit):
        main(["--checkpoints", "init:ViT-Tiny-8", "--train-data", "x.tar", "--task", "mocov3", "--zeroshot-data", "z"])
