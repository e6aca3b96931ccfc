"""``tools/compare_reducers``: token reducers compared as CLIP image towers on one trunk.

Each arm is one real ``dtp_ds.train`` run under the ``deepspeed`` launcher on the same shards,
samples, seed, ds_config and global batch; arms differ only in the trunk's ``reducer_cfg`` (and
the low-resolution control in its image size). After training, each arm's checkpoint is measured
in one process on real images of the zero-shot split: inference image-tower GFLOPs in eval mode
(FlopCounterMode, and fvcore for the users' convention), training GFLOPs per sample (a training-
mode forward and backward of the image tower: dropped, merged or padded tokens as they really
run). From the run's metrics: median step time without data wait, samples/s, peak memory,
zero-shot top-1 / top-5, training compression and mean tokens per block. An arm whose run already
finished (same command line, file contents, threads and code: :mod:`dtp_ds.bench.reuse`) is not
trained again. ``--seeds N``: every arm runs each seed (initialisation and data order change
with it); each column prints as ``mean +- half-width (n)`` (95% t interval over seeds), followed by
each arm's paired difference to ``--reference`` (default: plain) in top-1 and step time, and
whether its interval excludes zero ("separated") or not. Writes ``compare.json`` (per arm the
per-seed values, ``*_mean``, ``*_ci95``, ``*_diff_mean``, ``*_diff_ci95``, ``*_separated``),
``compare.csv`` (one row per arm and seed) and ``compare.png`` (zero-shot top-1 against inference
GFLOPs and against step time, 95% error bars).
"""
from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import os
import statistics
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtp_ds.bench import markdown_table
from dtp_ds.bench.boundary_ablation import add_arm_run_args, reference_of, run_arm, seeds_of
from dtp_ds.bench.stats import compare, interval_of, per_seed_table, separation_lines
from dtp_ds.data.decode import decode_image
from dtp_ds.eval.boundaries import list_images, val_transform
from dtp_ds.eval.flops import fvcore_macs, torch_macs
from dtp_ds.models import get_model_config, get_reducer_cfg
from dtp_ds.models.reducers import reducer_class
from dtp_ds.train.export import export_safetensors, load_model_from_checkpoint
from dtp_ds.train.metrics import read_metrics

BASE = "ViT-Tiny-8"  # widths, depth, patch, text tower of every arm
TRUNK_CFG = {"pool": "mean_with_cls", "stem": "conv"}
# arm -> the shipped tiny config whose reducer_cfg (and image size) it trains; every one but DRIP's
# own (its twins: the same trunk and compression) is sized to DRIP-ViT-Tiny-8-4x's inference FLOPs
# (tools/size_configs, flops_target)
ARM_MODELS: dict[str, str] = {
    "plain": "ViT-Tiny-8",
    "drip": "DRIP-ViT-Tiny-8-4x",  # the router, its count following content (selection adaptive)
    "drip-topk": "DRIPTopK-ViT-Tiny-8-4x",  # the router at a fixed count per image
    "drip-gumbel": "DRIPGumbel-ViT-Tiny-8-4x",  # the seed's DRIP: DTP's Gumbel-Sigmoid MLP
    "drip-prop": "DRIP-ViT-Tiny-8-4x",  # the adaptive router + proportional attention (REDUCER_OVERRIDES)
    "drip-uniform": "DRIPUniform-ViT-Tiny-8",
    "tome": "ToMe-ViT-Tiny-8",
    "tokenlearner": "TokenLearner-ViT-Tiny-8",
    "dynamicvit": "DynamicViT-ViT-Tiny-8",
    "dynamicvit-drop": "DynamicViTDrop-ViT-Tiny-8",
    "grouping": "Grouping-ViT-Tiny-8",
    "patch-dropout": "PatchDrop-ViT-Tiny-8",
    "low-res": "LowRes-ViT-Tiny-8",  # CLIPA's static strategy: the plain trunk at a lower resolution
}
# arm -> reducer_cfg keys set over its shipped config's: a hypothesis tested as an arm (issue 23)
REDUCER_OVERRIDES: dict[str, dict[str, Any]] = {
    "drip-prop": {"proportional_attention": True},  # a pooled segment of k patches keeps k keys' weight
}
ARMS: dict[str, tuple[dict[str, Any], int]] = {
    arm: ({**(get_reducer_cfg(name) or {"type": "none"}), **REDUCER_OVERRIDES.get(arm, {})},
          get_model_config(name)["vision_cfg"]["image_size"])
    for arm, name in ARM_MODELS.items()}
# DynamicViT distils from a plain trunk: the plain arm's export, when it ran first
TEACHER_ARM = "plain"
NOTES = {"dynamicvit": "training runs every token (masked attention) and the teacher",
         "dynamicvit-drop": "drops in training too; teacher", "patch-dropout": "inference runs every patch",
         "low-res": "fewer pixels, same trunk", "drip-uniform": "DRIP with evenly spaced boundaries",
         "drip": "count per image follows content", "drip-topk": "same count every image",
         "drip-gumbel": "the seed's Gumbel-Sigmoid DRIP",
         "drip-prop": "count follows content; log segment size per attention key"}
COLUMNS = [("arm", "arm", "{}"), ("params_m", "params (M)", "{:.2f}"), ("gflops", "GFLOPs", "{:.3f}"),
           ("gflops_fvcore", "fvcore", "{:.3f}"), ("train_gflops", "train GFLOPs/sample", "{:.3f}"),
           ("step_time", "step s", "{:.2f}"), ("samples_per_s", "samples/s", "{:.1f}"),
           ("peak_mem_gb", "peak GB", "{:.2f}"), ("zeroshot_top1", "top-1", "{:.1f}"),
           ("zeroshot_top5", "top-5", "{:.1f}"), ("compression", "train compr", "{:.2f}"),
           ("image_tokens", "tokens/block", "{:.1f}"), ("note", "note", "{}")]


def write_arm_config(arm: str, out_dir: str, teacher: str | None = None, seed: int = 0) -> str:
    """The arm's model JSON: the base with the arm's reducer (and image size); a reducer that
    distils from a teacher and names none gets ``teacher``."""
    reducer, image_size = copy.deepcopy(ARMS[arm])
    if teacher and "teacher" in inspect.signature(reducer_class(reducer["type"])).parameters:
        reducer.setdefault("teacher", teacher)
    cfg = copy.deepcopy(get_model_config(BASE))
    cfg["vision_cfg"].update(trunk_cfg=dict(TRUNK_CFG), reducer_cfg=reducer, image_size=image_size)
    path = os.path.join(out_dir, "configs", f"Compare-{arm}-s{seed}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def measure(run_dir: str, images: list[str], batch: int) -> dict[str, Any]:
    """Params and GFLOPs of a trained arm, on real images (per image)."""
    model, _ = load_model_from_checkpoint(run_dir)
    transform = val_transform(model)
    x = torch.stack([transform(decode_image(p)) for p in images[:batch]])
    visual = model.visual.eval()
    with torch.no_grad():
        row = {"gflops": torch_macs(visual, (x,)) / 1e9 / len(x),
               "gflops_fvcore": fvcore_macs(visual, (x,)) / 1e9 / len(x)}
    visual.train()
    counter = FlopCounterMode(display=False)
    with counter:
        visual(x).float().square().mean().backward()
    row["train_gflops"] = counter.get_total_flops() / 2 / 1e9 / len(x)  # multiply-adds, as above
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return row


def from_metrics(run_dir: str, global_batch: int) -> dict[str, Any]:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "step_time" in r][1:] or [r for r in rows if "step_time" in r]  # first: warm-up
    compute = statistics.median(r["step_time"] - r.get("data_time", 0.0) for r in steps)
    evals = [r for r in rows if "zeroshot_top1" in r]
    out = {"step_time": compute, "samples_per_s": global_batch / compute,
           "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in steps), **{k: evals[-1][k] for k in
                                                                            ("zeroshot_top1", "zeroshot_top5")}}
    for key in ("compression", "image_tokens"):
        vals = [r[key] for r in steps if key in r]
        out[key] = statistics.fmean(vals) if vals else None
    return out


KEYS = [k for k, _, _ in COLUMNS if k not in ("arm", "note")]
SEPARATION = [("zeroshot_top1", "top-1", "{:.1f}"), ("step_time", "step s", "{:.2f}")]


def per_seed_values(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    per_seed: dict[str, dict[str, dict[int, float]]] = {}
    for r in runs:
        arm = per_seed.setdefault(r["arm"], {k: {} for k in KEYS})
        for k in KEYS:
            if r.get(k) is not None:
                arm[k][r["seed"]] = float(r[k])
    return per_seed


def pair_rows(runs: list[dict[str, Any]], pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Extra paired differences, ``"A:B"`` -> A minus B (rows keyed ``"A - B"`` as :func:`compare`'s)."""
    per_seed, out = per_seed_values(runs), {}
    for pair in pairs:
        a, _, b = pair.partition(":")
        if a in per_seed and b in per_seed:
            out[a] = {**compare({b: per_seed[b], a: per_seed[a]}, KEYS, reference=b)[a]}
    return out


def summarize(runs: list[dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """:func:`dtp_ds.bench.stats.compare` of the per-seed rows (``arm``, ``seed`` and the columns)."""
    summary = compare(per_seed_values(runs), KEYS, reference=reference)
    for arm, row in summary.items():
        row["note"] = NOTES.get(arm)
    return summary


def write_outputs(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], out: str, meta: dict[str, Any]
                  ) -> None:
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({**meta, "arms": summary, "runs": runs}, f, indent=1)
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "seed", *KEYS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "gflops", "inference GFLOPs per image (FlopCounterMode)"),
                           (axes[1], "step_time", "training step time (s, median, no data wait)")):
        for arm, row in summary.items():
            x, y = interval_of(row, key), interval_of(row, "zeroshot_top1")
            xerr = [[x.mean - x.lo], [x.hi - x.mean]] if x.n > 1 else None
            yerr = [[y.mean - y.lo], [y.hi - y.mean]] if y.n > 1 else None
            ax.errorbar(x.mean, y.mean, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
            ax.annotate(arm, (x.mean, y.mean), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("zero-shot top-1 (%), mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare_reducers", description=__doc__.split("\n")[0])
    add_arm_run_args(p, list(ARMS), "logs/compare_reducers", reference="plain")
    p.add_argument("--flops-images", type=int, default=16, help="real images the GFLOPs are measured on")
    p.add_argument("--pairs", nargs="+", default=[], metavar="A:B",
                   help="further paired differences to report, A minus B (e.g. drip-uniform:drip)")
    a, extra = p.parse_known_args(argv)
    images = list_images(os.path.join(a.data, "zeroshot"), a.flops_images)
    if not images:
        p.error(f"--data {a.data}: no zeroshot/ images; run tools/make_synthetic_shards --out {a.data}")
    global_batch = a.batch_size * a.nproc
    # one epoch of exactly --steps steps (the loader cycles the shards): the LR curve spans the run
    extra = ["--log-every-n-steps", "1", "--train-num-samples", str(a.steps * global_batch), *extra]
    runs = []
    for seed in seeds_of(a):  # seed by seed: an interrupted run leaves whole seeds behind
        teacher = None
        for arm in a.arms:
            run = run_arm(arm, write_arm_config(arm, a.out, teacher, seed), a, extra, tool="compare", seed=seed)
            run_dir = run["run_dir"]
            runs.append({"arm": arm, "seed": seed, "run_dir": run_dir, **from_metrics(run_dir, global_batch),
                         **measure(run_dir, images, a.flops_images)})
            if arm == TEACHER_ARM:
                teacher = os.path.abspath(os.path.join(a.out, "teacher", f"{arm}-s{seed}.safetensors"))
                export_safetensors(run_dir, teacher)
    reference = reference_of(a)
    summary = summarize(runs, reference)
    pairs = pair_rows(runs, a.pairs)
    write_outputs(runs, summary, a.out, {"seeds": seeds_of(a), "reference": reference, "steps": a.steps,
                                         "global_batch": global_batch, "pairs": pairs})
    print(markdown_table(per_seed_table(summary, COLUMNS), [(k, h, "{}") for k, h, _ in COLUMNS]))
    print("\n".join(["", f"differences to {reference}, paired by seed (95% t interval; separated: it excludes 0):",
                     *separation_lines(summary, SEPARATION), *separation_lines(pairs, SEPARATION)]))
    print(f"compare: {a.steps} steps x global batch {global_batch} per arm and seed, same shards and ds_config; "
          f"seeds {seeds_of(a)}; cells: mean +- half-width of the 95% t interval (n seeds); GFLOPs are "
          f"multiply-adds per image on {len(images)} real images; {a.out}/compare.*", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
