"""The LR range test's arithmetic (dtp_ds.train.lr_range) on a problem whose good LR range is
known: least squares by minibatch SGD, where an LR is good if 100 steps at it cut the loss
tenfold (too low: no progress; too high: it blows up)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from dtp_ds.train.lr_range import ExponentialRamp, RangeTest, RangeTestConfig, plot

N, DIM, BATCH, STEPS = 512, 16, 128, 100


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g) * torch.logspace(-0.5, 0.5, DIM)  # curvatures over a decade
    y = x @ torch.randn(DIM, 1, generator=g) + 0.1 * torch.randn(N, 1, generator=g)
    return x, y


def sgd(lr: float, test: RangeTest | None = None) -> float:
    """STEPS minibatch SGD steps at ``lr`` (under the ramp when ``test``); the final full loss."""
    x, y = problem()
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(DIM, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ramp = LambdaLR(opt, ExponentialRamp(test.cfg)) if test else None
    for _ in range(STEPS):
        idx = torch.randint(0, N, (BATCH,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        now = opt.param_groups[0]["lr"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ramp:
            ramp.step()
            if test.record(now, loss.item()):
                break
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def good_range() -> tuple[float, float]:
    x, y = problem()
    start = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    good = [lr for lr in np.logspace(-5, 1, 25) if (f := sgd(float(lr))) < 0.1 * start and math.isfinite(f)]
    assert good and 1e-4 < min(good) and max(good) < 1.0, good  # a real range, inside the ramp
    return min(good), max(good)


def test_suggestions_land_in_the_good_range_and_the_test_stops_at_divergence(tmp_path):
    lo, hi = good_range()
    cfg = RangeTestConfig(start_lr=1e-5, end_lr=10.0, num_steps=STEPS)
    test = RangeTest(cfg)
    sgd(cfg.start_lr, test)
    out = test.result()
    assert lo <= out["steepest"] <= hi and lo <= out["min_loss_over_10"] <= hi, (lo, hi, out)
    # stopped by divergence, before the ramp's end, past the largest good LR
    assert out["stop_reason"].startswith("diverged") and out["steps"] < STEPS
    assert out["lr"][-1] > hi and out["smoothed_loss"][-1] > cfg.diverge * min(out["smoothed_loss"])
    # the LR the optimizer ran at is the exponential ramp
    want = [cfg.start_lr * (cfg.end_lr / cfg.start_lr) ** (i / (STEPS - 1)) for i in range(out["steps"])]
    np.testing.assert_allclose(out["lr"], want, rtol=1e-9)
    plot(out, str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").stat().st_size > 0


def test_smoothing_non_finite_stop_and_too_few_points():
    test = RangeTest(RangeTestConfig(smooth=0.5, num_steps=10, skip_start=1, skip_end=1))
    assert not test.record(1e-3, 4.0) and not test.record(2e-3, 2.0)
    assert test.smoothed == [4.0, 3.0]
    assert test.suggestions()["steepest"] is None and "too few" in test.suggestions()["why_none"]
    assert test.record(3e-3, float("nan")) and "non-finite" in test.stop_reason
    assert len(test.lrs) == 2  # the non-finite step is not on the curve
    done = RangeTest(RangeTestConfig(num_steps=3))
    assert [done.record(lr, 1.0) for lr in (1e-3, 2e-3, 3e-3)] == [False, False, True]
    assert done.stop_reason.startswith("ramp done")


@pytest.mark.parametrize("bad", [dict(start_lr=1.0, end_lr=0.1), dict(num_steps=1), dict(smooth=0.0),
                                 dict(diverge=1.0), dict(skip_end=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        RangeTestConfig(**bad).check()
