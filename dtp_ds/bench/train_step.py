"""Train-step benchmark: ViT-B-32 against DRIP-ViT-B-32 and every token-reduction family at B-32.

Per model, from one run: image-tower GFLOPs (torch FlopCounterMode, reducers at their configured rate), whole-CLIP
GFLOPs, the train step time of the whole CLIP model (forward, backward, AdamW step; plain
PyTorch, one process; warmup excluded; median of --steps), the image tower's forward+backward
time alone, samples/s, activation memory (bytes of the tensors autograd saves for backward,
image tower and whole model; on CUDA also torch.cuda.max_memory_allocated over the timed
steps), the compression the predictor actually produced, and every figure's ratio to the
baseline (ViT-B-32 when benchmarked, else the first model).

``--repeats N`` (N > 1) runs the whole benchmark N times, each in its own process (every model
in each, so a ratio is taken within one process), and prints per model the median step time over
all repeats' timed steps with a bootstrap 95% interval that resamples whole processes, and each
ratio as ``mean +- half-width (n)`` over repeats (t interval); the 1.15 target is called "holds"
only where the interval lies below it, "misses" only where it lies above, and otherwise "not
separated" (dtp_ds.bench.stats).

The target: step-time ratio <= 1.15 x training-FLOP ratio, for every model that cuts training
compute. The training FLOPs are counted on one more step run exactly as the timed ones
(FlopCounterMode around forward and backward: the tokens the reducer really ran, dropped, merged,
masked or padded, a teacher included; not inside a timed step, whose time the counter's dispatch
would inflate), so time and FLOPs describe the same work; inference GFLOPs at the configured rate
are shown too. The whole step also runs the text tower and the optimizer, which no reducer shrinks, so
the check is shown both for the whole step against whole-CLIP training FLOPs and for the image
tower's forward + backward against its own.

Usage (``tools/bench`` from a checkout, ``dtp-bench`` installed):
  tools/bench                                   # CPU defaults: batch 8, 2 warmup, 5 steps
  tools/bench --device cuda --batch-size 256 --precision bf16 --warmup 5 --steps 20
  tools/bench --models ViT-B-32 DRIP-ViT-B-32-10x --json
  tools/bench --repeats 5 --threads 2                 # intervals over 5 separate processes
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import open_clip
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dtp_ds
from dtp_ds.bench.stats import fmt, mean_ci, median_ci
from dtp_ds.eval.flops import count_flops
from dtp_ds.models import record_forward, trunks

FAMILIES = ["DRIPUniform", "ToMe", "TokenLearner", "DynamicViT", "DynamicViTDrop", "Grouping", "PatchDrop", "LowRes"]
DEFAULT_MODELS = ["ViT-B-32", "DRIP-ViT-B-32-4x", "DRIP-ViT-B-32-10x"] + [f"{f}-ViT-B-32" for f in FAMILIES]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves during a forward, split into
    the image tower's share and the total."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.total = 0
        self.visual = 0
        self.in_visual = False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
            if self.in_visual:
                self.visual += storage.nbytes()
        return t

    @contextlib.contextmanager
    def __call__(self) -> Iterator[SavedBytes]:
        def enter(*_: Any) -> None:
            self.in_visual = True

        def leave(*_: Any) -> None:
            self.in_visual = False

        hooks = [
            self.model.visual.register_forward_pre_hook(enter),
            self.model.visual.register_forward_hook(leave),
        ]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in hooks:
                h.remove()


def _step_times(fn: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _counted(fn: Callable[[], Any]) -> float:
    """GFLOPs (1 multiply-add = 1 FLOP) of one call of ``fn``, backward included."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One table row: build ``name``, count its FLOPs, time its train step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = dtp_ds.create_model(name, device=device, output_dict=True)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    size = model.visual.image_size
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    row: dict[str, Any] = {"model": name}
    flops = count_flops(model, image_size, model.context_length)
    row.update({k: flops[k] for k in ("gflops", "clip_gflops")})
    model.train()

    dtype = DTYPES[args.precision]
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.2)
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(args.batch_size, 3, *image_size, device=device)
    text = torch.randint(1, 49407, (args.batch_size, model.context_length), device=device)
    kept: list[torch.Tensor] = []  # fewest tokens per sample any block saw, per step

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(), record_forward() as rec:
            out = model(images, text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        for tower in rec:  # every reducer's auxiliary losses, weight 1 each (as training adds them)
            loss = loss + sum(tower.aux_losses.values())
            kept.append(tower.token_counts.min())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def image_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            feats = model.visual(images)
        feats.float().square().mean().backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # The first warmup step also measures what autograd saves (hooks cost time, not counted).
    saved = SavedBytes(model)
    with saved():
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["step_times"] = _step_times(step, max(args.warmup - 1, 0), args.steps, sync)
    row["step_s"] = statistics.median(row["step_times"])
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["image_step_times"] = _step_times(image_step, 1, args.steps, sync)
    row["image_step_s"] = statistics.median(row["image_step_times"])
    # Training FLOPs as the timed steps ran them (dropped, merged, masked or padded tokens, a
    # teacher), forward and backward: what the step time is held against.
    row["train_gflops"] = _counted(image_step) / args.batch_size
    row["clip_train_gflops"] = _counted(step) / args.batch_size
    row["samples_per_s"] = args.batch_size / row["step_s"]
    row["act_mb_image"] = saved.visual / 2**20
    row["act_mb_clip"] = saved.total / 2**20
    # The time is compared with the FLOPs of the tokens that actually ran (the fewest any block
    # saw, averaged over the timed steps), not with those of the configured rate.
    patches = trunks(model)[0].num_patches if trunks(model) else 0
    segments = float(torch.stack(kept).float().mean()) - 1.0 if kept else float(patches)
    if kept and segments < patches:
        row["compression"] = patches / segments
        ran = count_flops(model, image_size, model.context_length, segments=segments)
        row.update({"gflops_run": ran["gflops"], "clip_gflops_run": ran["clip_gflops"]})
    else:
        row["compression"] = 1.0
        row.update({"gflops_run": row["gflops"], "clip_gflops_run": row["clip_gflops"]})
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure's ratio to the baseline row (ViT-B-32 if present, else the first)."""
    base = next((r for r in rows if r["model"] == "ViT-B-32"), rows[0])
    keys = ["gflops", "clip_gflops", "gflops_run", "clip_gflops_run", "train_gflops", "clip_train_gflops", "step_s",
            "image_step_s", "act_mb_image", "act_mb_clip", "peak_mem_gb"]
    for r in rows:
        r["baseline"] = base["model"]
        for k in keys:
            if k in r and base.get(k):
                r[f"{k}_ratio"] = r[k] / base[k]
        # The target, <= 1.15 where training compute is cut: time ratio over training-FLOPs ratio.
        r["step_vs_flops"] = r["step_s_ratio"] / r["clip_train_gflops_ratio"]
        r["image_step_vs_flops"] = r["image_step_s_ratio"] / r["train_gflops_ratio"]


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("model", "model", "{}"),
        ("gflops", "GFLOPs", "{:.2f}"),
        ("gflops_ratio", "x", "{:.2f}"),
        ("clip_gflops", "CLIP GFLOPs", "{:.2f}"),
        ("clip_gflops_ratio", "x", "{:.2f}"),
        ("compression", "compr", "{:.2f}"),
        ("gflops_run", "GFLOPs@run", "{:.2f}"),
        ("gflops_run_ratio", "x", "{:.2f}"),
        ("train_gflops", "train GF", "{:.2f}"),
        ("train_gflops_ratio", "x", "{:.2f}"),
        ("clip_train_gflops_ratio", "CLIP train x", "{:.2f}"),
        ("step_s", "step s", "{:.3f}"),
        ("step_s_ratio", "x", "{:.2f}"),
        ("step_vs_flops", "step/flops", "{:.2f}"),
        ("image_step_s", "img f+b s", "{:.3f}"),
        ("image_step_s_ratio", "x", "{:.2f}"),
        ("image_step_vs_flops", "img/flops", "{:.2f}"),
        ("samples_per_s", "samples/s", "{:.1f}"),
        ("act_mb_image", "act MB img", "{:.1f}"),
        ("act_mb_image_ratio", "x", "{:.2f}"),
        ("act_mb_clip", "act MB", "{:.1f}"),
        ("peak_mem_gb", "peak GB", "{:.2f}"),
        ("peak_mem_gb_ratio", "x", "{:.2f}"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


TARGET = 1.15
RATIO_KEYS = ["gflops_ratio", "train_gflops_ratio", "clip_train_gflops_ratio", "step_s_ratio", "image_step_s_ratio",
              "step_vs_flops", "image_step_vs_flops", "samples_per_s", "act_mb_image_ratio", "peak_mem_gb_ratio"]


def _child_env() -> dict[str, str]:
    """This environment with the directory dtp_ds was imported from leading PYTHONPATH, so that
    ``python -m`` in a child process runs this same code (a checkout or an install)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": dtp_ds.IMPORT_ROOT + (os.pathsep + path if path else "")}


def run_repeats(argv: list[str], repeats: int) -> list[list[dict[str, Any]]]:
    """The benchmark ``repeats`` times, each in a fresh process (``--repeats 1 --json``): its rows."""
    out = []
    for i in range(repeats):
        cmd = [sys.executable, "-m", "dtp_ds.bench.train_step", *argv, "--repeats", "1", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
        if proc.returncode != 0:
            raise SystemExit(f"bench: repeat {i + 1} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout)["rows"])
        print(f"  repeat {i + 1}/{repeats} done", file=sys.stderr, flush=True)
    return out


def verdict(iv: Any, target: float = TARGET) -> str:
    if iv.n < 2:
        return "one repeat"
    return "holds" if iv.hi <= target else "misses" if iv.lo > target else "not separated"


def aggregate(repeats: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per model over repeats: ``step_s`` / ``image_step_s`` medians of all timed steps with a
    bootstrap interval over processes (``*_ci95``), every ratio's per-repeat values, ``*_mean``
    and ``*_ci95`` (t interval), and the target's verdict."""
    rows = []
    for i, first in enumerate(repeats[0]):
        per = [rep[i] for rep in repeats]
        row: dict[str, Any] = {"model": first["model"], "repeats": len(per),
                               **{k: first[k] for k in ("gflops", "clip_gflops", "compression") if k in first}}
        for key, times in (("step_s", "step_times"), ("image_step_s", "image_step_times")):
            iv = median_ci([r[times] for r in per])
            row.update({key: iv.mean, f"{key}_ci95": iv.as_list(), f"{key}_per_repeat": [r[key] for r in per]})
        for key in RATIO_KEYS:
            vals = [r[key] for r in per if r.get(key) is not None]
            if vals:
                iv = mean_ci(vals)
                row.update({f"{key}_per_repeat": vals, f"{key}_mean": iv.mean, f"{key}_ci95": iv.as_list(),
                            f"{key}_cell": fmt(iv, "{:.3f}" if "step" in key else "{:.2f}")})
        for key in ("step_vs_flops", "image_step_vs_flops"):
            if first.get("baseline") == first["model"]:
                row[f"{key}_target"] = "baseline"
            elif f"{key}_mean" in row:
                row[f"{key}_target"] = verdict(mean_ci(row[f"{key}_per_repeat"]))
        rows.append(row)
    return rows


def format_repeats(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "model"), ("gflops_ratio_cell", "GFLOPs x"), ("clip_train_gflops_ratio_cell", "CLIP train x"),
            ("step_cell", "step s (median [95%])"), ("step_s_ratio_cell", "step x"),
            ("step_vs_flops_cell", "step/flops"), ("step_vs_flops_target", "<= 1.15?"),
            ("image_step_s_ratio_cell", "img f+b x"), ("image_step_vs_flops_cell", "img/flops"),
            ("image_step_vs_flops_target", "<= 1.15?"), ("samples_per_s_cell", "samples/s")]
    cells = [[h for _, h in cols]]
    for r in rows:
        lo, hi = r["step_s_ci95"]
        r["step_cell"] = f"{r['step_s']:.3f} [{lo:.3f}, {hi:.3f}] ({r['repeats']})" if lo is not None else \
            f"{r['step_s']:.3f} ({r['repeats']})"
        cells.append([str(r.get(k, "-")) for k, _ in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="default: %(default)s")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s (CPU-sized)")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="autocast dtype, fp32 params (fp16 with a GradScaler); default: %(default)s")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, median reported (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW lr; small keeps the boundary rate near "
                        "its initial prior over the run (default: %(default)s)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="separate processes the benchmark runs in; > 1: medians and intervals over them")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = parser.parse_args(argv)
    if args.repeats > 1:
        raw = sys.argv[1:] if argv is None else list(argv)
        forwarded = [a for a in raw if a != "--json"]
        rows = aggregate(run_repeats(forwarded, args.repeats))
        if args.json:
            print(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
        else:
            print(f"device={args.device} batch={args.batch_size} precision={args.precision} steps={args.steps} "
                  f"warmup={args.warmup}, {args.repeats} repeats in separate processes")
            print(format_repeats(rows))
            print("step s: median of every timed step, 95% bootstrap interval resampling whole processes; x: ratio "
                  "to the baseline within each process, mean +- half-width of the 95% t interval (n repeats); "
                  "<= 1.15?: holds / misses only where the interval lies wholly below / above 1.15.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights per model
    rows = []
    for name in args.models:
        rows.append(bench_model(name, args))
        gc.collect()  # the previous model and its optimizer state go before the next is built
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if not args.json:
            print(f"  {name}: step {rows[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    add_ratios(rows)
    if args.json:
        print(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    else:
        print(f"device={args.device} batch={args.batch_size} precision={args.precision} "
              f"steps={args.steps} (median) warmup={args.warmup} checkpointing={args.grad_checkpointing}")
        print(format_table(rows))
        print("GFLOPs: FlopCounterMode per image (inference), reducers at their configured rate; compr: the "
              "compression the reducer produced in the timed steps; GFLOPs@run: inference at the tokens that ran; "
              "train GF: forward + backward of the image tower per sample as the timed step ran it; x: ratio to the "
              "baseline; step/flops: step-time ratio / CLIP training-FLOP ratio, img/flops: image f+b ratio / image "
              "training-FLOP ratio (target: <= 1.15 where training compute is cut); act MB: tensors saved for "
              "backward.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
