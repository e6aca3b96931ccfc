"""Launching ``dtp_ds.train`` runs from a tool: the ``deepspeed`` launcher of this environment,
the launch command of a run on the synthetic shards (``tools/make_synthetic_shards``' layout),
whether a run directory already holds a finished run of that command, and the closing summary
of a run's last zero-shot evaluation.

Used by the demos (``dtp_ds.demo``, ``dtp_ds.seqcomp.demo``), the benchmarks (``dtp_ds.bench``)
and ``tools/lr_find``: it sits in ``dtp_ds.train`` (it knows the training command line and its
``metrics.jsonl``) so that every one of them imports it downward.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from dtp_ds.train.metrics import read_metrics


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this interpreter's environment."""
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return here if os.path.exists(here) else (shutil.which("deepspeed") or "deepspeed")


def launch_command(data: str, logs: str, name: str, nproc: int, model: str, extra: list[str]) -> list[str]:
    """``deepspeed --num_gpus NPROC --module dtp_ds.train`` on ``data``'s shards (tiny.json, its
    zero-shot split, the layout split where there is one), logging to ``LOGS/NAME``; ``extra``: more flags."""
    shards = sorted(glob.glob(os.path.join(data, "train", "*.tar")))
    if not shards:
        raise SystemExit(f"no training shards in {data}/train: make them with tools/make_synthetic_shards --out {data}")
    first, last = (os.path.basename(s)[: -len(".tar")] for s in (shards[0], shards[-1]))
    train_data = os.path.join(data, "train", f"{{{first}..{last}}}.tar")
    return [
        deepspeed_launcher(), "--num_gpus", str(nproc), "--module", "dtp_ds.train",
        "--deepspeed_config", "ds_configs/tiny.json", "--model", model,
        "--train-data", train_data, "--zeroshot-data", os.path.join(data, "zeroshot"),
        *(["--zeroshot-extra", os.path.join(data, "layout")] if os.path.isdir(os.path.join(data, "layout")) else []),
        "--logs", logs, "--name", name, "--workers", "1", *extra,
    ]


def finished_as(run_dir: str, model: str, cmd: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (its final row) of this launch command's
    training arguments and of this model config (when ``model`` is a JSON file)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # the final row, not an evaluation row: a run stopped after an epoch's evaluation has those too
    if not os.path.isfile(metrics) or not any(r.get("final") for r in read_metrics(metrics)):
        return False
    with open(os.path.join(run_dir, "config.json")) as f:
        recorded = json.load(f)
    same = [a for a in recorded["command"][1:] if not a.startswith("--local_rank")] == \
        cmd[cmd.index("dtp_ds.train") + 1:]
    if same and os.path.isfile(model):
        with open(model) as f:
            same = json.load(f) == recorded.get("model_cfg")
    if not same:
        print(f"{run_dir}: trained with other arguments or another model config: training it again", flush=True)
    return same


# issue 23's targets for a count that follows content, printed beside the demo's figures
SEGMENTS_CV_TARGET = 0.15  # per-image segment count std / mean on the zero-shot split, at least
COMPRESSION_GAP_TARGET = 0.15  # |eval compression / training's - 1|, at most


def summary_lines(metrics_path: str) -> list[str]:
    """The demo's last lines: DRIP's boundaries as evaluation placed them (when the model has
    them), the layout split, zero-shot top-1 / top-5 against chance, then (DRIP) the per-image
    segment count on the zero-shot split and the eval compression against training's, each
    beside issue 23's target."""
    evals = [r for r in read_metrics(metrics_path) if "zeroshot_top1" in r]
    if not evals:
        raise SystemExit(f"demo: no zero-shot result in {metrics_path}")
    r = evals[-1]
    lines = []
    if "zeroshot_compression" in r:
        lines.append(f"demo: boundaries: segment purity {r.get('zeroshot_purity', float('nan')):.3f} "
                     f"vs {r.get('zeroshot_purity_even', float('nan')):.3f} for evenly spaced boundaries; "
                     f"boundary probability spread (q95 - q05) {r['zeroshot_prob_spread']:.3f}")
    if "layout_top1" in r:
        ratio = r["layout_top1"] / r["layout_chance_top1"]
        lines.append(f"demo: layout split: top-1 {r['layout_top1']:.1f}% = {ratio:.1f}x "
                     f"chance ({r['layout_chance_top1']:.2f}%), {r['layout_classes']} classes (which shape is left)")
    chance1 = r["zeroshot_chance_top1"]
    chance5 = min(100.0, 5 * chance1)
    lines.append(f"demo: zero-shot top-1 {r['zeroshot_top1']:.1f}% = {r['zeroshot_top1'] / chance1:.1f}x chance "
                 f"({chance1:.2f}%), top-5 {r['zeroshot_top5']:.1f}% = {r['zeroshot_top5'] / chance5:.1f}x chance "
                 f"({chance5:.2f}%), {r['zeroshot_classes']} held-out classes, step {r['step']}")
    if "zeroshot_segments_mean" in r:
        lines.append(f"demo: DRIP segments per image on the zero-shot split: mean {r['zeroshot_segments_mean']:.1f}, "
                     f"std {r['zeroshot_segments_std']:.1f}, std/mean {r['zeroshot_segments_cv']:.2f} "
                     f"(issue 23 target >= {SEGMENTS_CV_TARGET:.2f})")
    if "zeroshot_segments_edges_r" in r:
        def corr(name: str) -> str:
            k = f"zeroshot_segments_{name}_r"
            return f"r {r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]"
        outline = f", with shape outlines {corr('outline')}" if "zeroshot_segments_outline_r" in r else ""
        lines.append(f"demo: DRIP segments per image against scene complexity (95% interval over images): with "
                     f"edge density {corr('edges')}{outline} (issue 23 target: r > 0, interval above 0)")
    if "zeroshot_compression" in r:
        train = r.get("train_compression")
        gap = f"{100 * abs(r['zeroshot_compression'] / train - 1):.0f}% apart" if train else "training's not recorded"
        lines.append(f"demo: eval compression {r['zeroshot_compression']:.2f} vs training "
                     f"{train or float('nan'):.2f}: {gap} (issue 23 target within {100 * COMPRESSION_GAP_TARGET:.0f}%)")
    return lines
