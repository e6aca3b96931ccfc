"""The OOM probe: its search on a fake oracle, and for real on CPU (a tiny model under a real
DeepSpeed engine, the memory budget emulated with RLIMIT_AS in forked probe processes)."""
from __future__ import annotations

import math

import pytest

from dtp_ds.autotune.probe import probe_max_micro, search_max
from dtp_ds.autotune.tuner import tune


@pytest.mark.parametrize("start", [1, 7, 40, 64])
@pytest.mark.parametrize("limit", [0, 1, 2, 13, 37, 64, 100])
def test_search_finds_the_largest_fitting_micro_batch(start, limit):
    calls: list[int] = []

    def fits(m: int) -> bool:
        calls.append(m)
        return m <= limit

    cap = 64
    assert search_max(fits, start, cap) == min(limit, cap)
    assert len(calls) <= 2 * math.ceil(math.log2(cap)) + 2
    assert all(1 <= m <= cap for m in calls)


def test_search_stops_at_the_relative_tolerance():
    calls: list[int] = []

    def fits(m: int) -> bool:
        calls.append(m)
        return m <= 1000

    got = search_max(fits, 512, 1 << 14, rel_tol=0.05)
    assert 950 <= got <= 1000 and len(calls) < 12


def test_cpu_probe_binary_search_on_a_tiny_model():
    """Real training steps (ViT-Tiny-8, the tuner's DeepSpeed config) in forked processes whose
    address space is capped at 0.4 GiB over what imports and the process group took."""
    cfg = tune(["--model", "ViT-Tiny-8", "--partition", "local", "--global-batch", "16"]).data["ds_config"]
    res = probe_max_micro("ViT-Tiny-8", cfg, budget_gib=0.4, start=16, cap=64, device="cpu")
    assert res.max_micro >= 1
    ran = {p.micro: p.fits for p in res.probes}
    assert all(ok == (m <= res.max_micro) for m, ok in ran.items()), ran  # one boundary, found exactly
    assert ran.get(res.max_micro + 1) is False
    assert all("RLIMIT_AS" in p.mode for p in res.probes)
    ooms = [p for p in res.probes if p.oom]
    # failed allocations: torch's CPU allocator, or oneDNN's scratchpad ("could not create a primitive")
    assert ooms and all(any(k in (p.detail or "") for k in ("allocate memory", "primitive")) for p in ooms)
    assert all(p.peak_gib is not None and 0 < p.peak_gib <= 0.4 for p in res.probes if p.fits)
