"""SSL heads (dtp_ds.models.ssl_heads) and losses / synchronised BatchNorm
(dtp_ds.tasks.ssl_losses): structure, brute-force references on one rank, and two gloo ranks
against one rank on the concatenated batch (losses, outputs, running statistics, gradients)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dtp_ds.cluster.ports import free_port
from dtp_ds.models.ssl_heads import DINOHead, mocov3_predictor, mocov3_projector, simclr_projector
from dtp_ds.tasks.ssl_losses import (
    DINOLoss,
    SyncBatchNorm1d,
    TeacherTemperature,
    infonce,
    mocov3_loss,
    nt_xent,
    sync_batchnorm,
    teacher_temperature,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD, N, D, K = 2, 6, 8, 10  # ranks, samples per rank, feature width, DINO prototypes


def kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_mocov3_projector_and_predictor_layout():
    proj = mocov3_projector(32, hidden=64, out=16)
    assert kinds(proj) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not proj[-1].affine and proj[1].affine
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert proj(torch.randn(5, 32)).shape == (5, 16)
    pred = mocov3_predictor(16, hidden=64)
    assert kinds(pred) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert pred(torch.randn(5, 16)).shape == (5, 16)
    assert kinds(mocov3_projector(32, 4096, 256)) == kinds(proj) and mocov3_projector(32)[0].out_features == 4096


def test_simclr_projector_layers():
    assert kinds(simclr_projector(32, 64, 16)) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert len(simclr_projector(32, 64, 16, layers=3)) == 8
    with pytest.raises(ValueError):
        simclr_projector(32, layers=4)


def test_dino_head():
    head = DINOHead(32, out_dim=K, hidden=64, bottleneck=16)
    assert kinds(head.mlp) == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head(torch.randn(4, 32)).shape == (4, K)
    w = head.last_layer.weight()
    assert torch.allclose(w.norm(dim=1), torch.ones(K), atol=1e-6)  # weight-normalised, g fixed at 1
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert DINOHead(32, K, 64, 16, norm_last_layer=False).last_layer.weight_g.requires_grad
    # the bottleneck is L2-normalised: scaling the MLP's output changes nothing
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = head(x)
        head.mlp[-1].weight.mul_(3.0)
        head.mlp[-1].bias.mul_(3.0)
        assert torch.allclose(head(x), out, atol=1e-5)
    assert len(DINOHead(32, K, 64, 16, use_bn=True).mlp) == 7


def test_infonce_against_a_loop():
    torch.manual_seed(0)
    q, k = torch.randn(N, D), torch.randn(N, D)
    tau = 0.2
    qn, kn = F.normalize(q, dim=1).numpy(), F.normalize(k, dim=1).numpy()
    ref = 0.0
    for i in range(N):
        s = qn[i] @ kn.T / tau
        ref += -(s[i] - np.log(np.exp(s).sum()))
    ref = ref / N * 2 * tau
    assert float(infonce(q, k, tau)) == pytest.approx(ref, rel=1e-5)
    assert float(mocov3_loss(q, k, k, q, tau)) == pytest.approx(float(infonce(q, q, tau) + infonce(k, k, tau)))


def test_nt_xent_against_a_loop():
    torch.manual_seed(1)
    z1, z2 = torch.randn(N, D), torch.randn(N, D)
    tau = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1).numpy()
    ref = 0.0
    for i in range(2 * N):
        j = (i + N) % (2 * N)
        s = z[i] @ z.T / tau
        ref += -(s[j] - np.log(sum(np.exp(s[m]) for m in range(2 * N) if m != i)))
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(ref / (2 * N), rel=1e-5)


def test_dino_loss_against_a_loop_and_its_centre():
    torch.manual_seed(2)
    student = [torch.randn(N, K) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(N, K) for _ in range(2)]
    loss = DINOLoss(K, student_temp=0.1, teacher_temp=0.05, center_momentum=0.9)
    loss.center.fill_(0.3)
    ref, terms = 0.0, 0
    for i, t in enumerate(teacher):
        q = F.softmax((t - 0.3) / 0.05, dim=1)
        for v, s in enumerate(student):
            if v != i:
                ref += float((-q * F.log_softmax(s / 0.1, dim=1)).sum(1).mean())
                terms += 1
    assert terms == 6
    assert float(loss(student, teacher)) == pytest.approx(ref / terms, rel=1e-5)
    expected = 0.3 * 0.9 + 0.1 * torch.cat(teacher).mean(0)
    assert torch.allclose(loss.center[0], expected, atol=1e-6)
    loss.eval()
    loss(student, teacher)
    assert torch.allclose(loss.center[0], expected, atol=1e-6)  # no update outside training


def test_dino_centre_stays_fp32_under_a_module_cast():
    module = nn.Sequential(nn.Linear(4, K), DINOLoss(K))
    module[1].center.fill_(1 / 3)
    module.bfloat16()
    assert module[0].weight.dtype == torch.bfloat16 and module[1].center.dtype == torch.float32
    assert float(module[1].center[0, 0]) == pytest.approx(1 / 3, abs=1e-7)
    assert "1.center" in module.state_dict()


def test_teacher_temperature_warm_up_and_resume():
    assert teacher_temperature(0, 10) == pytest.approx(0.04)
    assert teacher_temperature(5, 10) == pytest.approx(0.055)
    assert teacher_temperature(50, 10) == pytest.approx(0.07)
    assert teacher_temperature(3, 0) == pytest.approx(0.07)

    class State:
        step = 0

    loss = DINOLoss(K)
    sched = TeacherTemperature(loss, warmup_steps=4)
    assert loss.teacher_temp == pytest.approx(0.04)
    State.step = 2
    sched.step(State)
    assert loss.teacher_temp == pytest.approx(0.055) and sched.metrics(2) == {"teacher_temp": pytest.approx(0.0475)}
    other = DINOLoss(K)
    resumed = TeacherTemperature(other, warmup_steps=4)
    resumed.load_state_dict(sched.state_dict())
    assert other.teacher_temp == pytest.approx(0.055)
    with pytest.raises(ValueError, match="warm-up"):
        TeacherTemperature(DINOLoss(K), warmup_steps=5).load_state_dict(sched.state_dict())


def test_sync_batchnorm_on_one_rank_is_batchnorm():
    """Converted on one rank too (its fp32 arithmetic serves 16-bit modules): the same outputs,
    running statistics and state-dict keys as torch's BatchNorm1d."""
    ref = mocov3_projector(8, 16, 4)
    m = sync_batchnorm(copy.deepcopy(ref))
    assert any(isinstance(x, SyncBatchNorm1d) for x in m.modules()) and m.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(12, 8)
    torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m[1].running_var, ref[1].running_var)


# --- two gloo ranks against one rank on the concatenated batch


def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    full = {name: torch.randn(WORLD * N, D, generator=g) for name in ("x", "coef", "q1", "q2", "k1", "k2", "z1", "z2")}
    full["student"] = torch.randn(4, WORLD * N, K, generator=g)
    full["teacher"] = torch.randn(2, WORLD * N, K, generator=g)
    return full


def bn() -> nn.BatchNorm1d:
    m = nn.BatchNorm1d(D, momentum=0.1)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, D))
        m.bias.copy_(torch.linspace(-1, 1, D))
    return m


def compute(rows: slice) -> dict[str, torch.Tensor]:
    """Everything the comparison needs, on the batch rows ``rows`` (this rank's, or all)."""
    full = data()
    part = {k: (v[:, rows] if k in ("student", "teacher") else v[rows]).clone() for k, v in full.items()}
    out: dict[str, torch.Tensor] = {}
    norm = sync_batchnorm(bn())
    x = part["x"].requires_grad_()
    y = norm(x)
    (y * part["coef"]).sum().backward()
    out.update(bn_y=y.detach(), bn_dx=x.grad, bn_dw=norm.weight.grad, bn_db=norm.bias.grad,
               bn_mean=norm.running_mean.clone(), bn_var=norm.running_var.clone())
    q1, q2 = part["q1"].requires_grad_(), part["q2"].requires_grad_()
    moco = mocov3_loss(q1, q2, part["k1"], part["k2"], 0.2)
    moco.backward()
    out.update(moco=moco.detach(), moco_dq1=q1.grad, moco_dq2=q2.grad)
    z1, z2 = part["z1"].requires_grad_(), part["z2"].requires_grad_()
    simclr = nt_xent(z1, z2, 0.1)
    simclr.backward()
    out.update(simclr=simclr.detach(), simclr_dz1=z1.grad, simclr_dz2=z2.grad)
    student = part["student"].requires_grad_()
    dino = DINOLoss(K, teacher_temp=0.04)
    loss = dino(list(student), list(part["teacher"]))
    loss.backward()
    out.update(dino=loss.detach(), dino_ds=student.grad, dino_center=dino.center.clone())
    return out


def _rank(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(compute(slice(rank * N, (rank + 1) * N)), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    path = str(tmp_path_factory.mktemp("ssl_ranks") / "out")
    mp.spawn(_rank, args=(free_port(), path), nprocs=WORLD, join=True)
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def test_two_ranks_train_what_one_rank_trains_on_the_whole_batch(two_ranks):
    one = compute(slice(0, WORLD * N))
    ranks = two_ranks

    def rows(key: str) -> torch.Tensor:  # the ranks' per-sample tensors, in batch order
        return torch.cat([r[key] for r in ranks], dim=1 if key == "dino_ds" else 0)

    # BatchNorm: outputs and running statistics of the global batch; input gradients of the
    # summed loss; the ranks' parameter gradients sum to the whole batch's
    assert torch.allclose(rows("bn_y"), one["bn_y"], atol=1e-5)
    for r in ranks:
        assert torch.allclose(r["bn_mean"], one["bn_mean"], atol=1e-6)
        assert torch.allclose(r["bn_var"], one["bn_var"], atol=1e-5)
    assert torch.allclose(rows("bn_dx"), one["bn_dx"], atol=1e-5)
    assert torch.allclose(ranks[0]["bn_dw"] + ranks[1]["bn_dw"], one["bn_dw"], atol=1e-5)
    assert torch.allclose(ranks[0]["bn_db"] + ranks[1]["bn_db"], one["bn_db"], atol=1e-5)
    # the losses: the ranks' mean is the whole batch's; each rank's gradient is WORLD x the
    # whole batch loss's (DeepSpeed's average over ranks divides it back)
    for name, grads in (("moco", ("moco_dq1", "moco_dq2")), ("simclr", ("simclr_dz1", "simclr_dz2")),
                        ("dino", ("dino_ds",))):
        mean = sum(float(r[name]) for r in ranks) / WORLD
        assert mean == pytest.approx(float(one[name]), rel=1e-5), name
        for g in grads:
            assert torch.allclose(rows(g) / WORLD, one[g], atol=1e-6), g
            assert float(one[g].abs().max()) > 1e-4, g  # the comparison sees gradients
    for r in ranks:
        assert torch.allclose(r["dino_center"], one["dino_center"], atol=1e-6)


def test_the_two_rank_comparison_can_fail(two_ranks):
    """A BatchNorm with per-rank statistics (no synchronisation) gives other outputs."""
    full = data()["x"]
    local = torch.cat([bn()(full[r * N:(r + 1) * N]) for r in range(WORLD)]).detach()
    whole = torch.cat([r["bn_y"] for r in two_ranks])
    assert not torch.allclose(local, whole, atol=1e-3)
    assert math.isfinite(float(two_ranks[0]["moco"]))


def test_heads_run_in_16_bit_with_fp32_buffers():
    """DeepSpeed's bf16 casts a module's parameters, not always its buffers: the heads' BatchNorm
    computes in fp32 (torch's CPU batch_norm refuses bf16 input with fp32 running statistics) and
    returns the input's dtype, in training (running statistics updated) and in evaluation."""
    from dtp_ds.models.ssl_heads import mocov3_projector
    from dtp_ds.tasks.ssl_losses import sync_batchnorm

    ref = mocov3_projector(8, 16, 4)
    head = sync_batchnorm(copy.deepcopy(ref))
    for p in head.parameters():
        p.data = p.data.bfloat16()
    x = torch.randn(6, 8)
    out = head(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(x), atol=0.1, rtol=0.05)
    bn, bn_ref = head[1], ref[1]
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, atol=0.02, rtol=0.05)
    head.eval(), ref.eval()
    torch.testing.assert_close(head(x.bfloat16()).float(), ref(x), atol=0.1, rtol=0.05)
