"""dtp_ds.bench.stats and dtp_ds.bench.reuse: intervals that cover at their stated rate, paired
differences, the sustained time-to-target rule, overhead accounting and the reuse hash."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dtp_ds.bench import reuse
from dtp_ds.bench.stats import (
    compare,
    fmt,
    mean_ci,
    median_ci,
    overhead_ratios,
    paired_diff,
    separation_lines,
    time_to_target,
    welch_diff,
)


@pytest.mark.parametrize("n", [3, 10])
def test_the_t_interval_covers_a_known_mean_95_percent_of_the_time(n):
    rng = np.random.default_rng(n)
    true_mean, draws = 3.0, 2000
    covered = 0
    for _ in range(draws):
        iv = mean_ci(rng.normal(true_mean, 2.0, size=n))
        covered += iv.lo <= true_mean <= iv.hi
    assert 0.93 <= covered / draws <= 0.97


def test_a_t_interval_matches_the_textbook_one():
    # n = 4, mean 2.5, sd sqrt(5/3); t(0.975, 3) = 3.182446 (a printed table)
    iv = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * np.sqrt(5 / 3) / 2
    assert (iv.mean, iv.lo, iv.hi, iv.n) == pytest.approx((2.5, 2.5 - half, 2.5 + half, 4), abs=1e-5)
    assert fmt(iv, "{:.2f}") == f"2.50 +- {half:.2f} (4)"
    assert fmt(mean_ci([7.0]), "{:.1f}") == "7.0 (1)"  # one seed: no interval, and it says n


def test_a_shared_per_seed_offset_separates_paired_but_not_unpaired():
    rng = np.random.default_rng(0)
    seeds = range(5)
    offset = {s: rng.normal(0, 5.0) for s in seeds}  # what a seed does to both arms (data order, init)
    ref = {s: 50.0 + offset[s] + rng.normal(0, 0.1) for s in seeds}
    arm = {s: 51.0 + offset[s] + rng.normal(0, 0.1) for s in seeds}
    paired = paired_diff(arm, ref, "arm", "ref")
    unpaired = welch_diff(list(arm.values()), list(ref.values()))
    assert paired.separated and paired.interval.lo > 0.5
    assert not unpaired.excludes(0.0)
    assert paired.interval.mean == pytest.approx(unpaired.mean)  # same difference, different interval


def test_paired_differences_use_only_the_seeds_both_arms_ran():
    d = paired_diff({0: 3.0, 1: 5.0, 2: 100.0}, {0: 1.0, 1: 2.0, 7: 0.0})
    assert d.seeds == (0, 1) and d.interval.mean == pytest.approx(2.5) and d.interval.n == 2


def test_compare_writes_per_seed_values_means_intervals_and_separation():
    per_seed = {"plain": {"top1": {0: 30.0, 1: 32.0, 2: 31.0}},
                "drip": {"top1": {0: 33.0, 1: 35.1, 2: 34.0}},  # +3 on every seed
                "tome": {"top1": {0: 28.0, 1: 36.0, 2: 29.0}}}  # noisy around plain
    rows = compare(per_seed, ["top1"], reference="plain")
    assert rows["plain"]["top1"] == {"0": 30.0, "1": 32.0, "2": 31.0}
    assert rows["plain"]["top1_mean"] == pytest.approx(31.0)
    lo, hi = rows["plain"]["top1_ci95"]
    assert lo < 31.0 < hi and "top1_diff_mean" not in rows["plain"]
    assert rows["drip"]["top1_diff_mean"] == pytest.approx(3.0333, abs=1e-3) and rows["drip"]["top1_separated"]
    assert not rows["tome"]["top1_separated"]
    lines = separation_lines(rows, [("top1", "top-1", "{:.1f}")])
    assert lines[0].startswith("drip - plain, top-1: 3.0 [") and lines[0].endswith(": separated")
    assert lines[1].endswith(": not separated")


def test_the_bootstrap_median_of_repeats_resamples_whole_processes():
    rng = np.random.default_rng(1)
    # three processes, each steady inside (tiny spread) but at a different level
    groups = [list(level + rng.normal(0, 0.001, 20)) for level in (1.0, 1.1, 1.3)]
    by_process = median_ci(groups)
    pooled_steps = median_ci([t for g in groups for t in g])
    assert by_process.n == 3 and pooled_steps.n == 60
    assert by_process.lo <= 1.01 and by_process.hi >= 1.29  # the spread between processes
    assert pooled_steps.hi - pooled_steps.lo < by_process.hi - by_process.lo


# the sustained rule on hand-made curves (times, top-1), target 20
def test_a_first_touch_then_a_dip_is_not_sustained():
    times, top1 = [10, 20, 30, 40, 50], [12, 21, 15, 20, 22]
    assert time_to_target(times, top1, 20.0) == (40, 20)


def test_a_curve_that_never_reaches_the_target():
    assert time_to_target([10, 20, 30], [5, 19.9, 10], 20.0) == (None, None)


def test_reaching_the_target_on_the_last_evaluation():
    assert time_to_target([10, 20, 30], [5, 19, 20], 20.0) == (30, 30)
    assert time_to_target([10, 20, 30], [25, 26, 19], 20.0) == (None, 10)  # falls away at the end


def test_overhead_is_charged_to_the_method():
    # the method reaches the target in 60 s against the baseline's 200 s and needed 100 s to
    # choose its schedule: (60 + 100) / 200 = 0.8 with it, 0.3 without; it saves 0.7 of the
    # baseline's time, so the 100 s pay back at a baseline time to target of 100 / 0.7 s
    r = overhead_ratios(60.0, 200.0, 100.0)
    assert r == pytest.approx({"ratio": 0.8, "ratio_without_overhead": 0.3, "payback_baseline_s": 100 / 0.7})
    # slower than the baseline: the overhead is never paid back; never reached: no ratio
    assert overhead_ratios(250.0, 200.0, 100.0)["payback_baseline_s"] is None
    assert overhead_ratios(None, 200.0, 100.0)["ratio"] is None


def test_the_reuse_hash_sees_file_contents_threads_and_code(tmp_path):
    schedule = tmp_path / "schedule.json"
    schedule.write_text('{"segments": [[0.5, "r=0.5"]]}')
    argv = ["--seqcomp-schedule", str(schedule), "--seed", "0"]
    threads = {"OMP_NUM_THREADS": "1"}
    first = reuse.reuse_hash(argv, reuse.files_in(argv), threads, revision="abc")
    assert first == reuse.reuse_hash(argv, reuse.files_in(argv), threads, revision="abc")
    schedule.write_text('{"segments": [[0.5, "r=0.75"]]}')  # same path, same argv, new contents
    changed = reuse.reuse_hash(argv, reuse.files_in(argv), threads, revision="abc")
    assert changed != first
    assert reuse.reuse_hash(argv, [schedule], {"OMP_NUM_THREADS": "2"}, revision="abc") != changed
    assert reuse.reuse_hash(argv, [schedule], threads, revision="abd") != changed
    run = tmp_path / "run"
    run.mkdir()
    reuse.record(str(run), changed)
    assert reuse.reusable(str(run), changed) and not reuse.reusable(str(run), first)


def test_the_code_revision_counts_uncommitted_changes(tmp_path):
    import subprocess

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    clean = reuse.code_revision.__wrapped__(tmp_path, "pkg")
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    edited = reuse.code_revision.__wrapped__(tmp_path, "pkg")
    (tmp_path / "pkg" / "b.py").write_text("y = 1\n")  # untracked
    added = reuse.code_revision.__wrapped__(tmp_path, "pkg")
    assert len({clean, edited, added}) == 3


def test_a_named_code_revision_stands_in_for_git(monkeypatch):
    monkeypatch.setenv(reuse.REVISION_VAR, "pinned")
    assert reuse.reuse_hash(["a"], [], {}) == reuse.reuse_hash(["a"], [], {}, revision="pinned")
    monkeypatch.delenv(reuse.REVISION_VAR)
    assert reuse.reuse_hash(["a"], [], {}) == reuse.reuse_hash(["a"], [], {}, revision=reuse.code_revision())


def test_correlation_from_sums_is_pearsons_r_with_scipys_fisher_interval() -> None:
    """r and its interval from all-reducible sums equal scipy's on the raw pairs; two halves'
    sums added (two ranks) give the same; a constant variable has no r."""
    from scipy import stats as sps

    from dtp_ds.bench.stats import correlation_from_sums

    rng = np.random.default_rng(0)
    x = rng.integers(10, 30, 200).astype(float)
    y = 0.3 * x + rng.normal(0, 3, 200)

    def sums(a, b):
        return np.array([len(a), a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])

    ref = sps.pearsonr(x, y)
    ci = ref.confidence_interval(0.95)
    got = correlation_from_sums(*(sums(x[:70], y[:70]) + sums(x[70:], y[70:])))
    assert got.mean == pytest.approx(ref.statistic, abs=1e-9) and got.n == 200
    assert (got.lo, got.hi) == pytest.approx((ci.low, ci.high), abs=1e-9) and got.excludes(0.0)
    assert math.isnan(correlation_from_sums(*sums(np.full(50, 3.0), y[:50])).mean)
