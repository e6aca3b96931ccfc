"""``tools/seqcomp_costs``: the measured cost table of seqcomp strategies.

For one model, one task (``--task``, default ``clip``; the task's own flags, as
``python -m dtp_ds.train --help`` lists them, may follow) and a grid of strategies (``--rates`` x
``--patches``), times a whole training step of the task's module (CLIP: both towers, the
contrastive loss; MoCo v3: both views through the student and the momentum encoder; then
backward and an AdamW step; plain PyTorch in one process as ``tools/bench`` does; ``--warmup``
steps excluded; median of ``--steps``) at a fixed batch, in the trainer's seqcomp forward
(every trunk's ``set_seqcomp``, the momentum encoder's included, train mode, the token
dropout seeded), and counts its FLOPs (``FlopCounterMode``, forward + backward of the step, 1
multiply-add = 1 FLOP). The batch is synthetic, of the task's shapes (its data stage run once on
a generated image: each float tensor, an image or view, filled with N(0, 1) noise, the others
such as CLIP's tokens the stage's own, repeated). Each row has:

- ``step_s`` / ``per_sample_s``: the median step time and the time per sample;
- ``step_per_forward``: the step time over the time of one **full-sequence forward** of the
  task's whole module (train mode, no grad) at the same batch (the issue's normalisation; an
  full-sequence step is ~3-4 forwards);
- ``cost``: the step time over the full-sequence step's (r = 0, p = stored: 1 by construction):
  the unit ``--seqcomp-schedule`` counts in (a full-sequence step = 1), so the estimator
  (``tools/seqcomp_schedule``) and the schedule file carry it as each strategy's ``cost``;
- ``gflops_step`` and ``flops_cost`` (its ratio to the full-sequence step's) beside them: the
  text tower (CLIP), the heads (the SSL tasks' projectors, predictor, DINO's head) and the
  optimizer do not shrink with the input, so neither falls as fast as the image tower's FLOPs (the Amdahl
  limit).

The JSON (``--out``): ``{"model", "task", "device", "batch_size", "warmup", "steps", "forward_s",
"full_sequence_step_s", "patch_size", "strategies": [{"r", "p", "cost", ...}, ...]}``;
:func:`~dtp_ds.train.seqcomp_schedule.load_costs` reads it back (the estimator's costs;
``--seqcomp-costs`` fills the cost of schedule segments that give none). Timings on a
shared CPU are noisy: use several ``--steps``, and measure on the hardware and model the
schedule will train (``--device cuda``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtp_ds.models import trunks
from dtp_ds.models.seqcomp import NONE, SeqComp, image_tower_cost
from dtp_ds.train.seqcomp_schedule import cost_of, load_costs  # noqa: F401  (the table's readers, re-exported)


def strategy_grid(rates: Iterable[float], patches: Iterable[int | None]) -> list[SeqComp]:
    """Every (r, p) of the grid, the full-sequence one first, duplicates dropped."""
    out = [NONE]
    for p in patches:
        for r in rates:
            s = SeqComp(float(r), None if p is None else int(p))
            if s not in out:
                out.append(s)
    return out


# wall: elapsed time; cpu: this process's CPU time (all its threads), which other jobs on a
# shared CPU do not inflate (with one thread and no waiting, what the step itself costs)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_time(fn: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], None],
                 clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


def _flops(fn: Callable[[], Any]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 2


def task_config(task: str, argv: Sequence[str] = ()) -> Any:
    """The ``task``'s settings (its ``Config``) from its own flags in ``argv`` (as ``python -m
    dtp_ds.train`` takes them; unset flags keep the Config's defaults), checked by the task;
    ``ValueError`` naming a flag it does not have."""
    from dtp_ds.tasks import task_type

    cls = task_type(task)
    p = argparse.ArgumentParser(prog=f"--task {task}", add_help=False, exit_on_error=False)
    cls.add_flags(lambda *flags, **kw: p.add_argument(*flags, **kw))
    try:
        ns, unknown = p.parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        raise ValueError(f"--task {task}: {e}") from e
    if unknown:
        raise ValueError(f"{' '.join(unknown)}: not flags of this tool nor of --task {task}")
    given = {k: v for k, v in vars(ns).items() if v is not None}
    cfg = dataclasses.replace(cls.Config(), **given)
    cls.check(cfg)
    return cfg


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="clip",
                   help="the task whose training step is measured (a dtp_ds.tasks name: clip, classify, mocov3, "
                        "simclr, dino, ...); its own flags (python -m dtp_ds.train --help, group --task NAME) may "
                        "follow, e.g. --moco-mlp-dim 1024 (default: %(default)s)")


def synthetic_batch(task: Any, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of the task's keys and shapes: its data stage run on a generated image (its own
    random state left as it was); each float tensor (image, view) drawn as N(0, 1) noise, each
    other tensor (tokens, labels) the stage's value repeated ``batch_size`` times."""
    from PIL import Image

    stage = task.data_stage()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        one = stage(Image.new("RGB", (256, 256), (120, 90, 60)), {k: b"0" for k in stage.keys})
    if len(one) < len(task.batch_keys):
        raise ValueError(f"--task {task.name}: its data stage gives {len(one)} tensors for the batch keys "
                         f"{task.batch_keys}")
    out = {}
    for key, t in zip(task.batch_keys, one):
        t = torch.as_tensor(t)
        if t.is_floating_point():
            out[key] = torch.randn(batch_size, *t.shape, device=device)
        else:
            out[key] = t.unsqueeze(0).expand(batch_size, *t.shape).clone().to(device)
    return out


def measure_costs(model_name: str, strategies: Sequence[SeqComp], batch_size: int = 16, warmup: int = 2,
                  steps: int = 5, device: str = "cpu", seed: int = 0, clock: str = "wall", task: str = "clip",
                  config: Any = None) -> dict[str, Any]:
    """The cost table (module doc) of ``strategies`` on a freshly built ``model_name`` trained as
    ``task`` (settings ``config``, its Config; None: the defaults), timed by ``clock`` (:data:`CLOCKS`)."""
    from dtp_ds.tasks import TaskSpec, build_task

    dev = torch.device(device)
    if clock == "cpu" and dev.type != "cpu":
        raise ValueError(f"--clock cpu times the host process; on {device} use --clock wall")
    timer = CLOCKS[clock]
    if clock == "cpu":  # one thread: a thread spinning while it waits for another would count as work
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    built = build_task(task, TaskSpec(model_name, config=config))
    module = built.module.to(dev)
    found = trunks(module)  # every trunk the trainer applies seqcomp to (a momentum encoder's too)
    if not found:
        raise ValueError(f"{model_name}: no dtp_ds image trunk for seqcomp (open_clip's own ViT has none); use e.g. "
                         f"PatchStem-ViT-Tiny-8 or a DRIP model")
    trunk = found[0]
    for s in strategies:
        trunk.check_seqcomp(s)
    batch = synthetic_batch(built, batch_size, dev)
    params = [p for p in module.parameters() if p.requires_grad]  # a momentum encoder is not trained
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.2)  # tiny lr: the weights barely move
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    module.train()

    def set_all(s: SeqComp) -> None:
        for t in found:
            t.set_seqcomp(s)

    def forward() -> None:
        with torch.no_grad():
            module(batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module(batch)["loss"].backward()
        opt.step()

    set_all(NONE)
    forward_s = _median_time(forward, warmup, steps, sync, timer)
    rows = []
    for s in strategies:
        set_all(s)
        torch.manual_seed(seed)
        step_s = _median_time(step, warmup, steps, sync, timer)
        rows.append({"r": s.rate, "p": s.patch_or(trunk.patch_size), "strategy": s.describe(), "step_s": step_s,
                     "per_sample_s": step_s / batch_size, "step_per_forward": step_s / forward_s,
                     "gflops_step": _flops(step) / batch_size / 1e9,
                     "image_tower_flops_est": image_tower_cost(trunk, s)})
    set_all(NONE)
    base = next((r for r, s in zip(rows, strategies) if s.is_identity(trunk.patch_size)), None)
    if base is None:  # the grid left the full-sequence step out: time it as the unit
        torch.manual_seed(seed)
        base = {"step_s": _median_time(step, warmup, steps, sync, timer),
                "gflops_step": _flops(step) / batch_size / 1e9}
    for r in rows:
        r["cost"] = r["step_s"] / base["step_s"]
        r["flops_cost"] = r["gflops_step"] / base["gflops_step"]
    image_size = list(trunk.img_size) if isinstance(trunk.img_size, tuple | list) else [trunk.img_size] * 2
    return {"model": model_name, "task": task, "device": str(dev), "clock": clock, "threads": torch.get_num_threads(),
            "batch_size": batch_size, "warmup": warmup, "steps": steps,
            "patch_size": trunk.patch_size, "image_size": image_size, "forward_s": forward_s,
            "full_sequence_step_s": base["step_s"], "torch": torch.__version__, "strategies": rows}


def format_table(data: dict[str, Any]) -> str:
    from dtp_ds.bench import markdown_table

    cols = [("strategy", "strategy", "{}"), ("r", "r", "{:g}"), ("p", "p", "{}"), ("step_s", "step s", "{:.4f}"),
            ("per_sample_s", "s/sample", "{:.5f}"), ("step_per_forward", "step / fwd", "{:.2f}"),
            ("cost", "cost (step=1)", "{:.3f}"), ("gflops_step", "GFLOPs/sample f+b", "{:.4f}"),
            ("flops_cost", "FLOPs cost", "{:.3f}"), ("image_tower_flops_est", "img-tower est", "{:.3f}")]
    return markdown_table(data["strategies"], cols)


def patch_arg(text: str) -> int | None:
    """A ``--patches`` item: a patch size, or ``stored`` (the trunk's own)."""
    return None if text in ("stored", "none", "0") else int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqcomp_costs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PatchStem-ViT-Tiny-8")
    add_task_args(p)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--patches", type=patch_arg, nargs="+", default=[None],
                   help="patch sizes ('stored': the model's own; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time (a shared CPU: set OMP_NUM_THREADS=1)")
    p.add_argument("--out", default="logs/seqcomp_costs.json")
    a, rest = p.parse_known_args(argv)
    try:
        config = task_config(a.task, rest)
    except ValueError as e:
        p.error(str(e))
    data = measure_costs(a.model, strategy_grid(a.rates, a.patches), a.batch_size, a.warmup, a.steps, a.device, a.seed,
                         a.clock, a.task, config)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)
    print(format_table(data))
    print(f"seqcomp_costs: {data['model']} (--task {data['task']}) on {data['device']}, batch "
          f"{data['batch_size']}: full-sequence forward {data['forward_s']:.4f} s, step "
          f"{data['full_sequence_step_s']:.4f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
