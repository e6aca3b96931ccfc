"""The momentum teacher (dtp_ds.models.momentum) on real 2-rank DeepSpeed engines on CPU: after
each optimizer step the gathered teacher is the EMA of the gathered student, under ZeRO-2 and
ZeRO-3 (partitioned and persistent parameters), fp32 and bf16; one launch of this file as the
ranks' script:

    deepspeed --num_gpus 2 tests/dist/test_momentum_teacher.py OUT

(rank 0 writes OUT/results.json). The schedule's arithmetic and state are tested in-process.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dtp_ds.models.momentum import MomentumTeacher, cosine_momentum

CASES = [(2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]
STEPS, BASE, TOTAL = 3, 0.9, 4
PERSIST = 100  # ZeRO-3 keeps parameters of at most this many elements whole (the biases here)


class Pair(nn.Module):
    """A student MLP and its teacher (a copy); the loss pulls the student towards the teacher."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
        self.teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.student(x)
        with torch.no_grad():
            t = self.teacher(x)
        return ((s.float() - t.float()) ** 2).mean() + 0.1 * (s.float() ** 2).mean()


class State:
    step = 0


def gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = p.detach().double().clone()
    return out


def run_case(stage: int, precision: str, rank: int) -> dict:
    import deepspeed

    torch.manual_seed(0)
    pair = Pair()
    teacher = MomentumTeacher(pair.student, pair.teacher, BASE, TOTAL)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": PERSIST}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    optimizer = torch.optim.SGD([p for p in pair.parameters() if p.requires_grad], lr=0.5)
    engine, *_ = deepspeed.initialize(model=pair, optimizer=optimizer, config=cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tol = 2.0 ** -8 if precision == "bf16" else 1e-6  # half a bf16 step (relative) / fp32 rounding
    res = {"err": [], "partition_err": [], "no_update_err": [], "momentum": [], "persistent": 0, "partitioned": 0}
    for step in range(1, STEPS + 1):
        g = torch.Generator().manual_seed(100 * step + rank)
        loss = engine(torch.randn(4, 16, generator=g).to(dtype))
        engine.backward(loss)
        before = gathered(pair.teacher)
        engine.step()
        State.step = step
        m = teacher.momentum(step - 1)
        teacher.step(State)
        student, after = gathered(pair.student), gathered(pair.teacher)
        err = part_err = no_update = 0.0
        for name, t in pair.teacher.named_parameters():
            ref = m * before[name] + (1 - m) * student[name]
            scale = tol * ref.abs() + 1e-7
            err = max(err, float(((after[name] - ref).abs() / scale).max()))
            no_update = max(no_update, float(((before[name] - ref).abs() / scale).max()))
            if hasattr(t, "ds_tensor"):  # this rank's slice of the partitioned parameter
                n = t.ds_tensor.numel()
                flat = ref.flatten()[rank * n:(rank + 1) * n]
                mine = t.ds_tensor.detach().double()[:flat.numel()]
                part_err = max(part_err, float(((mine - flat).abs() / (tol * flat.abs() + 1e-7)).max()))
                if step == 1:
                    res["persistent" if t.ds_numel <= PERSIST else "partitioned"] += 1
        res["err"].append(err)
        res["partition_err"].append(part_err)
        res["no_update_err"].append(no_update)
        res["momentum"].append(m)
    res["teacher_dtypes"] = sorted({str(p.dtype) for p in pair.teacher.parameters()})
    res["teacher_trainable"] = any(p.requires_grad for p in pair.teacher.parameters())
    res["zero3"] = all(hasattr(p, "ds_tensor") for p in pair.parameters())
    return res


def main(out: str) -> None:
    import logging

    import deepspeed
    import torch.distributed as dist

    from dtp_ds.cluster.process_group import init_process_group

    deepspeed.utils.logger.setLevel(logging.ERROR)
    init_process_group(dist_backend="gloo")
    rank = dist.get_rank()
    results = {f"{stage}:{precision}": run_case(stage, precision, rank) for stage, precision in CASES}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


# --- the pytest side


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)


def test_teacher_is_frozen_copied_and_resumes_its_schedule():
    torch.manual_seed(0)
    pair = Pair()
    mt = MomentumTeacher(pair.student, pair.teacher, 0.99, 10)
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    assert all(p.requires_grad for p in pair.student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(pair.student.parameters(), pair.teacher.parameters()))
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in pair.teacher.parameters()]
    State.step = 1
    mt.step(State)
    for t, before, s in zip(pair.teacher.parameters(), t0, pair.student.parameters()):
        assert torch.allclose(t, 0.99 * before + 0.01 * s, atol=1e-6)
    assert mt.metrics(1) == {"momentum": pytest.approx(0.99)} and mt.metrics(6)["momentum"] > 0.99
    saved = mt.state_dict()
    other = MomentumTeacher(Pair().student, Pair().teacher, 0.99, 10)
    other.load_state_dict(saved)
    assert other.updates == 1 and other.state_dict() == saved
    with pytest.raises(ValueError, match="momentum schedule"):
        MomentumTeacher(Pair().student, Pair().teacher, 0.996, 10).load_state_dict(saved)
    with pytest.raises(ValueError, match="no student parameter"):
        MomentumTeacher(nn.Linear(3, 4), nn.Linear(3, 5), 0.99, 10)


def test_bf16_teacher_stays_bf16_and_moves_by_one_rounding():
    student, teacher = nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8).bfloat16()
    mt = MomentumTeacher(student, teacher, 0.5, 10, copy=False)
    t0, s0 = teacher.weight.detach().double().clone(), student.weight.detach().double()
    mt.update(0.5)
    assert teacher.weight.dtype == torch.bfloat16
    assert torch.equal(teacher.weight.double(), (0.5 * t0 + 0.5 * s0).to(torch.bfloat16).double())


@pytest.mark.dist
def test_two_rank_engines_update_the_teacher_as_the_ema_of_the_student(tmp_path):
    from dtp_ds.cluster.ports import free_port
    from tests.conftest import REPO

    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "results.json").read_text())
    for case in (f"{s}:{p}" for s, p in CASES):
        for r in ranks:
            res = r[case]
            assert max(res["err"]) <= 1.0, (case, res)  # within the tolerance, at every step
            assert max(res["partition_err"]) <= 1.0, (case, res)
            assert min(res["no_update_err"]) > 10.0, (case, res)  # a missed update would show
            assert res["momentum"] == pytest.approx([cosine_momentum(k, TOTAL, BASE) for k in range(STEPS)])
            assert res["teacher_dtypes"] == ["torch.bfloat16" if case.endswith("bf16") else "torch.float32"]
            assert not res["teacher_trainable"]
            assert res["zero3"] == case.startswith("3")
            if case.startswith("3"):  # both kinds of ZeRO-3 parameter were updated
                assert res["persistent"] == 2 and res["partitioned"] == 2, res


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
