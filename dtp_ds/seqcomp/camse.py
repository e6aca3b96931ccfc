"""``tools/seqcomp_schedule``: the CA-MSE (cost-adjusted mean squared error of the gradient)
schedule estimator ("Accelerating Augmentation Invariance Pretraining", Lin et al. 2024).

Inputs: the task (``--task``, default ``clip``; its own flags, as ``python -m dtp_ds.train
--help`` lists them, may follow), checkpoints of a pilot run of it, one per **stage** (e.g. at
0/25/50/75/100% of it: run directories, ``checkpoints/step_N`` directories, exported
``*.safetensors`` files, or ``init:MODEL`` for a freshly built task at step 0), the training
shards, the global batch, a
candidate grid of strategies (``--rates`` x ``--patches``) and the cost table of
``tools/seqcomp_costs`` (``--costs``; each strategy's ``cost`` in units of a full-sequence
step; a strategy the table lacks falls back to the image tower's estimated FLOP fraction, with a
warning: it ignores the text tower and the heads, so it flatters seqcomp). A checkpoint
directory rebuilds the task's whole module (the trunk, its heads, a momentum encoder: their
gradients and the loss depend on them), with the task settings its run recorded (``RUN/config.json``;
else the flags given); an exported file holds the model alone (an SSL task's heads and momentum
encoder are then fresh, with a warning).

Per stage, every strategy ``s`` runs on the same ``K`` global batches (read once through the
task's data stage, the train augmentation seeded per sample, then kept: a two-view task's views
are the same tensors for every strategy; paired samples, so the bias estimate is a paired
difference) through the same seqcomp forward as training (every trunk's ``set_seqcomp``,
a momentum encoder's included, train mode, the token dropout and any other random draw seeded
per batch, the module's buffers, e.g. DINO's centre and BatchNorm statistics, restored after each
gradient), and the task module's whole-batch loss (CLIP: contrastive + the reducer's auxiliary
losses; MoCo v3: the symmetric InfoNCE against the momentum encoder's keys; ...) is
back-propagated in fp32 in one process: at r = 0 the gradient is the full-sequence one exactly.
From running sums only (per parameter group: ``sum g``, ``sum ||g||^2``, and of the paired
difference ``d = g_s - g_0``: ``sum d``, ``sum ||d||^2``; never a K x P matrix):

- ``var`` = tr Cov(g_s) = (sum ||g||^2 - K ||mean g||^2) / (K - 1): the variance of one
  minibatch gradient at the global batch;
- ``bias2`` = ||E g_s - E g_0||^2, estimated without its finite-K bias:
  ||mean d||^2 - tr Cov(d) / K (E ||mean d||^2 = ||E d||^2 + tr Cov(d) / K); it can come out
  slightly negative where the true bias is ~0 (the identity strategy: exactly 0);
- ``cost_var`` = cost_s x var: at a fixed compute budget a strategy costing ``c_s`` per sample
  affords ``1 / c_s`` times the samples, dividing the variance by ``1 / c_s``;
- ``camse`` = bias2 + cost_var.

Figures are reported per parameter group (``image`` tower, ``text`` tower, ``logit_scale``,
``reducer``: a boundary predictor / token reducer's own parameters; ``head``: an SSL task's
projector, predictor or DINO head) and in ``total`` (their sum: squared norms add over
disjoint groups; a momentum encoder is not trained and has no gradient). The standard error ``se`` of the total CA-MSE
comes from ``--replicates`` disjoint groups of the K batches (the spread of their estimates
over sqrt(replicates)); it only decides ties.

**Choice** per stage: the strategy of least total CA-MSE; every strategy within one standard
error of it ties, and a tie goes to the mildest strategy (the highest cost). ``--monotone``
forbids a later stage a cheaper strategy (a later stage may only pick a strategy whose
cost is at least the previous choice's).

**Schedule** (the ``--seqcomp-schedule`` JSON of :mod:`dtp_ds.train.seqcomp_schedule`): stage
``i`` (at fraction ``f_i`` of the pilot: its step over the last checkpoint's, or ``--fractions``)
runs its choice over ``[f_i, f_{i+1})``; the stage at 1.0 is reported but spans nothing. The last
``--final-fraction`` of training (default 0.1) is left full-sequence (the parser adds that final
segment; ``--final-fraction 0`` runs the last stage's choice to the end). Adjacent equal
segments merge. Each segment carries its strategy's ``cost`` from the table, so the trainer's
cost units are the measured ones. Written beside it: ``SCHEDULE.md`` (the tables) and
``SCHEDULE.png`` (CA-MSE, squared bias, cost-adjusted variance against stage, one line per
strategy, as the paper's panels).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtp_ds.models.seqcomp import NONE, SeqComp, image_tower_cost

log = logging.getLogger(__name__)

GROUPS = ("image", "text", "logit_scale", "reducer", "head")


def param_group(name: str) -> str:
    """Which reported group a CLIP parameter belongs to."""
    if name in ("logit_scale", "logit_bias"):
        return "logit_scale"
    if ".reducer." in name or name.startswith("visual.reducer"):
        return "reducer"
    if name.startswith("visual."):
        return "image"
    return "text"


def module_groups(module: nn.Module) -> dict[str, str]:
    """The reported group of every trained parameter of a task's module, by its name there: a
    trunk's reducer's -> ``reducer``, the rest of a trunk -> ``image``; the others by
    :func:`param_group` on their model's names (CLIP's image tower around the trunk, its logit
    scale, its text tower), ``text`` becoming ``head`` in a module without a text tower (an SSL
    task's projector, predictor, DINO head). A momentum encoder (``requires_grad`` off) has none."""
    from dtp_ds.models import trunks

    in_trunk, in_reducer = set(), set()
    for t in trunks(module):
        in_trunk |= {id(p) for p in t.parameters()}
        reducer = getattr(t, "reducer", None)
        if isinstance(reducer, nn.Module):
            in_reducer |= {id(p) for p in reducer.parameters()}
    has_text = any(callable(getattr(m, "encode_text", None)) for m in module.modules())
    out = {}
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in in_reducer:
            out[n] = "reducer"
        elif id(p) in in_trunk:
            out[n] = "image"
        else:
            g = param_group(n.removeprefix("model."))
            out[n] = "head" if g == "text" and not has_text else g
    return out


# --- running moments --------------------------------------------------------------------------

class Moments:
    """Running sums of one strategy's gradients (and of their paired differences to the
    full-sequence ones) per group, in ``replicates`` disjoint groups of batches."""

    def __init__(self, sizes: dict[str, int], replicates: int = 1) -> None:
        self.sizes = dict(sizes)
        self.replicates = replicates
        f64 = torch.float64
        self.sum_g = [{k: torch.zeros(n, dtype=f64) for k, n in sizes.items()} for _ in range(replicates)]
        self.sum_d = [{k: torch.zeros(n, dtype=f64) for k, n in sizes.items()} for _ in range(replicates)]
        self.sq_g = [dict.fromkeys(sizes, 0.0) for _ in range(replicates)]
        self.sq_d = [dict.fromkeys(sizes, 0.0) for _ in range(replicates)]
        self.count = [0] * replicates

    def add(self, g: dict[str, torch.Tensor], g0: dict[str, torch.Tensor], index: int) -> None:
        """Batch ``index``'s gradient ``g`` of this strategy and ``g0`` of the full-sequence one."""
        j = index % self.replicates
        for k in self.sizes:
            a = g[k].double()
            d = a - g0[k].double()
            self.sum_g[j][k] += a
            self.sum_d[j][k] += d
            self.sq_g[j][k] += float(a.dot(a))
            self.sq_d[j][k] += float(d.dot(d))
        self.count[j] += 1

    def _pooled(self, which: Sequence[int]) -> tuple[int, dict[str, Any]]:
        n = sum(self.count[j] for j in which)
        out = {k: (sum(self.sum_g[j][k] for j in which), sum(self.sq_g[j][k] for j in which),
                   sum(self.sum_d[j][k] for j in which), sum(self.sq_d[j][k] for j in which)) for k in self.sizes}
        return n, out

    def estimate(self, cost: float) -> dict[str, Any]:
        """Per group and ``total``: bias2, var, cost_var, camse (+ the raw ||mean d||^2), and the
        total's standard error ``se`` from the replicates (nan with fewer than 2 of >= 2 batches)."""
        n, pooled = self._pooled(range(self.replicates))
        res = estimate_from_sums(pooled, n, cost)
        reps = [estimate_from_sums(self._pooled([j])[1], self.count[j], cost)["total"]["camse"]
                for j in range(self.replicates) if self.count[j] >= 2]
        if len(reps) >= 2:
            mean = sum(reps) / len(reps)
            res["total"]["se"] = math.sqrt(sum((x - mean) ** 2 for x in reps) / (len(reps) - 1) / len(reps))
        else:
            res["total"]["se"] = float("nan")
        return res


def estimate_from_sums(sums: dict[str, tuple], n: int, cost: float) -> dict[str, dict[str, float]]:
    """The module doc's estimators from per-group ``(sum g, sum ||g||^2, sum d, sum ||d||^2)``
    over ``n`` >= 2 batches."""
    if n < 2:
        raise ValueError(f"{n} batch(es): the variance needs at least 2 (--batches)")
    out: dict[str, dict[str, float]] = {}
    for k, (sg, qg, sd, qd) in sums.items():
        mg, md = sg / n, sd / n
        var = max(0.0, (qg - n * float(mg.dot(mg))) / (n - 1))
        var_d = max(0.0, (qd - n * float(md.dot(md))) / (n - 1))
        raw = float(md.dot(md))
        bias2 = raw - var_d / n
        out[k] = {"bias2": bias2, "bias2_raw": raw, "var": var, "cost_var": cost * var, "camse": bias2 + cost * var}
    keys = ("bias2", "bias2_raw", "var", "cost_var", "camse")
    out["total"] = {key: sum(v[key] for v in out.values()) for key in keys}
    return out


# --- choice and schedule ----------------------------------------------------------------------

@dataclass
class Candidate:
    strategy: SeqComp
    cost: float
    camse: float
    se: float = float("nan")


def choose(cands: Sequence[Candidate], min_cost: float | None = None) -> Candidate:
    """Least CA-MSE; everything within one standard error of the least ties, and a tie goes to
    the mildest strategy (highest cost). ``min_cost``: only strategies at least that costly
    (``--monotone``: no cheaper strategy than the previous stage's choice)."""
    pool = [c for c in cands if min_cost is None or c.cost >= min_cost - 1e-12]
    if not pool:
        raise ValueError("no candidate strategy left (the grid must hold the full-sequence one)")
    best = min(pool, key=lambda c: c.camse)
    margin = best.se if math.isfinite(best.se) else 0.0
    tied = [c for c in pool if c.camse <= best.camse + margin]
    return max(tied, key=lambda c: (c.cost, -c.camse))


def choose_all(stages: Sequence[Sequence[Candidate]], monotone: bool = False) -> list[Candidate]:
    out: list[Candidate] = []
    for cands in stages:
        out.append(choose(cands, out[-1].cost if monotone and out else None))
    return out


def schedule_segments(fractions: Sequence[float], chosen: Sequence[Candidate], final_fraction: float = 0.1
                      ) -> list[dict[str, Any]]:
    """The schedule file's segments: stage ``i``'s choice over ``[f_i, f_{i+1})``, the last
    stage over ``[f_last, 1)`` (nothing when it sits at 1), all cut at ``1 - final_fraction``
    (left for the parser's final full-sequence segment); adjacent equal strategies merged."""
    if not 0.0 <= final_fraction < 1.0:
        raise ValueError(f"--final-fraction {final_fraction}: must be in [0, 1)")
    end = 1.0 - final_fraction
    segs: list[dict[str, Any]] = []
    starts = [0.0, *fractions[1:]]  # the first stage starts training whatever its fraction
    for i, c in enumerate(chosen):
        lo, hi = starts[i], (starts[i + 1] if i + 1 < len(starts) else 1.0)
        lo, hi = min(lo, end), min(hi, end)
        if hi - lo <= 1e-9:
            continue
        s = c.strategy
        row = {"fraction": hi - lo, "r": s.rate, "p": s.patch, "cost": c.cost, "stage": i}
        if segs and segs[-1]["r"] == row["r"] and segs[-1]["p"] == row["p"]:
            segs[-1]["fraction"] += row["fraction"]
        else:
            segs.append(row)
    if not segs:  # no seqcomp (or everything cut): one full-sequence segment
        segs.append({"fraction": 1.0, "r": 0.0, "p": None, "cost": 1.0})
    for s in segs:
        s["fraction"] = round(s["fraction"], 9)
        s.pop("stage", None)
    return segs


# --- gradients of a loaded model --------------------------------------------------------------

def recorded_task_config(spec: str) -> dict[str, Any] | None:
    """The task settings the run of checkpoint ``spec`` recorded (``RUN/config.json``), or None."""
    from dtp_ds.train.export import resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(spec)
    for run_dir in (os.path.dirname(os.path.dirname(ckpt)), os.path.dirname(ckpt)):
        path = os.path.join(run_dir, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return ((json.load(f).get("args") or {}).get("task_config")) or None
    return None


def _fit(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor reshaped to ``target``'s where only the shape differs (an
    export's 0-dim logit scale, the trainer's 1-element one)."""
    return {k: v.reshape(target[k].shape) if k in target and v.shape != target[k].shape
            and v.numel() == target[k].numel() else v for k, v in state.items()}


def load_stage(spec: str, task: str = "clip", config: Any = None, seed: int = 0) -> tuple[Any, str, int | None]:
    """(the built ``task``, its weights the stage's, in fp32; model name; training step or None)
    for one stage: ``init:MODEL`` (built fresh, seeded: step 0), an exported ``*.safetensors``
    (the model's weights; the module's other parts fresh), or a dtp_ds checkpoint / run dir (the
    whole module, built with the task settings its run recorded, else ``config``)."""
    import dataclasses

    from dtp_ds.tasks import TaskSpec, build_task, task_type

    def build(name: str, cfg: Any) -> Any:
        torch.manual_seed(seed)
        return build_task(task, TaskSpec(name, config=cfg))

    if spec.startswith("init:"):
        name = spec[len("init:"):]
        return build(name, config), name, 0
    if spec.endswith(".safetensors"):
        from dtp_ds.train.export import exported_metadata, load_exported

        meta = exported_metadata(spec)
        if (meta.get("task") or "clip") != task:
            raise ValueError(f"{spec}: exported from a --task {meta.get('task') or 'clip'} run, not --task {task}")
        built = build(meta["model_name"], config)
        target = built.model.state_dict()
        built.model.load_state_dict(_fit(load_exported(spec, output_dict=True).state_dict(), target))
        if sum(p.numel() for p in built.module.parameters()) > sum(p.numel() for p in built.model.parameters()):
            log.warning("%s: an export holds the model alone; the task's other parts (heads, a momentum encoder) "
                        "are fresh: give the checkpoint directory for their trained weights", spec)
        step = meta.get("step")
        return built, meta["model_name"], int(step) if step else None
    from dtp_ds.train.export import _register_model, module_fp32_state, read_model_states, resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(spec)
    states = read_model_states(ckpt)
    if (states.get("task") or "clip") != task:
        raise ValueError(f"{spec}: a checkpoint of --task {states.get('task') or 'clip'}, not --task {task}")
    name = states.get("model_name")
    if not name:
        raise ValueError(f"{ckpt}: the checkpoint's client state has no 'model_name' (not written by dtp_ds.train)")
    _register_model(name, states.get("model_cfg"), ckpt)  # the checkpoint's model config, as the export does
    recorded = recorded_task_config(spec)
    if recorded is not None:
        fields = {f.name for f in dataclasses.fields(task_type(task).Config)}
        config = task_type(task).Config(**{k: v for k, v in recorded.items() if k in fields})
    built = build(name, config)
    module = built.module
    # the trainer's whole module: the model, and a task's heads and momentum encoder
    saved = module_fp32_state(ckpt, built.model, states)
    target = module.state_dict()
    state = {k: saved[k] for k in target if k in saved}
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(f"{ckpt}: weights do not fit --task {task}'s module of model '{name}': missing "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    module.load_state_dict(_fit(state, target), strict=True)
    step = (states.get("train_state") or {}).get("step")
    return built, name, None if step is None else int(step)


def load_batches(train_data: str, task: Any, global_batch: int, count: int, seed: int = 0
                 ) -> list[dict[str, torch.Tensor]]:
    """``count`` global batches (dicts of the built ``task``'s batch keys) from the shards, through
    its data stage with the train augmentation (seeded per sample, as the trainer's loader
    does), read once: every strategy then sees the same tensors (two views: the same views)."""
    from dtp_ds.data.shards import DataConfig, make_train_loader, plan_epoch, resolve_shards

    shards, _ = resolve_shards(train_data)
    plan = plan_epoch(count * global_batch, global_batch, 1, 1, 1)
    loader = make_train_loader(DataConfig(train_data=train_data, workers=0, dataset_resampled=False), shards, plan,
                               task.data_stage(), global_batch, epoch=0, seed=seed, rank=0, world_size=1)
    keys = task.batch_keys
    out = []
    for batch in loader:
        out.append(dict(zip(keys, batch[:len(keys)])))
        if len(out) == count:
            break
    if len(out) < count:
        raise ValueError(f"{train_data}: {len(out)} batches of {global_batch}, {count} wanted")
    return out


class GradientProbe:
    """Whole-batch loss gradients of a task's ``module`` per parameter group under a strategy."""

    def __init__(self, module: nn.Module) -> None:
        from dtp_ds.models import trunks

        self.module = module.float().train()
        self.trunks = trunks(self.module)  # every trunk the trainer applies seqcomp to (a momentum encoder's too)
        if not self.trunks:
            raise ValueError("no dtp_ds image trunk for seqcomp (open_clip's own ViT has none)")
        self.groups = module_groups(self.module)
        self.params = [(n, p) for n, p in self.module.named_parameters() if n in self.groups]
        self.sizes: dict[str, int] = {}
        for n, p in self.params:
            self.sizes[self.groups[n]] = self.sizes.get(self.groups[n], 0) + p.numel()

    @property
    def stored_patch(self) -> int:
        return self.trunks[0].patch_size

    def check(self, s: SeqComp) -> None:
        for t in self.trunks:
            t.check_seqcomp(s)

    def grads(self, s: SeqComp, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The gradient under ``s`` on ``batch``, every random draw from ``seed``; the module's
        buffers (BatchNorm statistics, DINO's centre) as they were before, after it."""
        buffers = {n: b.detach().clone() for n, b in self.module.named_buffers()}
        for t in self.trunks:
            t.set_seqcomp(s)
        try:
            self.module.zero_grad(set_to_none=True)
            torch.manual_seed(seed)  # the token dropout's draw (and any other)
            self.module(batch)["loss"].backward()
        finally:
            for t in self.trunks:
                t.set_seqcomp(NONE)
            with torch.no_grad():
                for n, b in self.module.named_buffers():
                    b.copy_(buffers[n])
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.sizes}
        for n, p in self.params:
            parts[self.groups[n]].append(torch.zeros(p.numel()) if p.grad is None else p.grad.detach().reshape(-1))
        return {k: torch.cat(v) for k, v in parts.items()}


def estimate_stage(module: nn.Module, strategies: Sequence[SeqComp], costs: Sequence[float],
                   batches: Sequence[dict[str, torch.Tensor]], replicates: int = 1, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """One stage of a task's ``module``: per strategy, :meth:`Moments.estimate` over ``batches``
    (paired: every strategy sees the same batches and, per batch, the same seed)."""
    probe = GradientProbe(module)
    for s in strategies:
        probe.check(s)
    moments = [Moments(probe.sizes, replicates) for _ in strategies]
    for k, batch in enumerate(batches):
        g0 = probe.grads(NONE, batch, seed + k)
        for s, m in zip(strategies, moments):
            g = g0 if s.is_identity(probe.stored_patch) else probe.grads(s, batch, seed + k)
            m.add(g, g0, k)
    return [m.estimate(c) for m, c in zip(moments, costs)]


# --- outputs ----------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    from dtp_ds.bench import markdown_table

    lines = [f"# CA-MSE schedule: {result['model']} (--task {result.get('task', 'clip')}), global batch "
             f"{result['global_batch']}, {result['batches']} batches per stage", "",
             "CA-MSE = bias^2 + cost x Var (total over parameter groups; se: one standard error of CA-MSE, from "
             f"{result.get('replicates', '?')} batch groups, {max(0, result.get('replicates', 1) - 1)} degrees of "
             "freedom; * = chosen)", ""]
    rows = []
    for st in result["stages"]:
        for r in st["strategies"]:
            t = r["groups"]["total"]
            rows.append({"stage": f"{st['fraction']:.2f}", "ckpt": os.path.basename(st["checkpoint"].rstrip("/")),
                         "strategy": r["strategy"] + (" *" if r["chosen"] else ""), "cost": r["cost"],
                         "bias2": t["bias2"], "var": t["var"], "cost_var": t["cost_var"], "camse": t["camse"],
                         "se": t["se"]})
    lines.append(markdown_table(rows, [("stage", "stage", "{}"), ("ckpt", "checkpoint", "{}"),
                                       ("strategy", "strategy", "{}"), ("cost", "cost", "{:.3f}"),
                                       ("bias2", "bias^2", "{:.4g}"), ("var", "Var", "{:.4g}"),
                                       ("cost_var", "cost x Var", "{:.4g}"), ("camse", "CA-MSE", "{:.4g}"),
                                       ("se", "se", "{:.2g}")]))
    lines += ["", "## Per parameter group (bias^2 / cost x Var)", ""]
    groups = [g for g in GROUPS if any(g in r["groups"] for st in result["stages"] for r in st["strategies"])]
    rows = []
    for st in result["stages"]:
        for r in st["strategies"]:
            row = {"stage": f"{st['fraction']:.2f}", "strategy": r["strategy"]}
            for g in groups:
                v = r["groups"].get(g)
                row[g] = None if v is None else f"{v['bias2']:.3g} / {v['cost_var']:.3g}"
            rows.append(row)
    lines.append(markdown_table(rows, [("stage", "stage", "{}"), ("strategy", "strategy", "{}")]
                                + [(g, g, "{}") for g in groups]))
    lines += ["", "## Schedule", "", "| fraction | strategy | cost |", "| --- | --- | --- |"]
    for s in result["segments"]:
        desc = SeqComp(s["r"] or 0.0, s["p"]).describe()
        lines.append(f"| {s['fraction']:.3g} | {desc} | {s['cost']:.3f} |")
    left = 1.0 - sum(s["fraction"] for s in result["segments"])
    if left > 1e-6:
        lines.append(f"| {left:.3g} | none (final, full-sequence) | 1.000 |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["strategy"] for r in result["stages"][0]["strategies"]]
    xs = [100 * st["fraction"] for st in result["stages"]]
    for ax, key, title in zip(axes, ("camse", "bias2", "cost_var"),
                              ("CA-MSE", "squared bias", "cost-adjusted variance")):
        for i, name in enumerate(names):
            ys = [st["strategies"][i]["groups"]["total"][key] for st in result["stages"]]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("training stage (% of the pilot)")
        values = [abs(st["strategies"][i]["groups"]["total"][key]) for st in result["stages"]
                  for i in range(len(names))]
        nonzero = [v for v in values if v > 0]
        signed = [st["strategies"][i]["groups"]["total"][key] for st in result["stages"] for i in range(len(names))]
        if min(signed) > 0:
            ax.set_yscale("log")
        else:  # the debiased squared bias is 0 (identity) or slightly negative where the bias is ~0
            ax.set_yscale("symlog", linthresh=min(nonzero) if nonzero else 1e-12)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: gradient error per strategy (global batch {result['global_batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the tool ---------------------------------------------------------------------------------

def default_replicates(batches: int) -> int:
    """Groups of at least 2 batches each, at most 5: 10 batches or more give the tie rule's
    standard error 4 degrees of freedom (replicates - 1)."""
    return max(1, min(5, batches // 2))


def run(checkpoints: Sequence[str], train_data: str, strategies: Sequence[SeqComp], global_batch: int,
        batches: int, costs_path: str | None = None, fractions: Sequence[float] | None = None,
        replicates: int | None = None, monotone: bool = False, final_fraction: float = 0.1, seed: int = 0,
        progress: bool = True, task: str = "clip", config: Any = None) -> dict[str, Any]:
    """The estimator end to end (no files written): ``{"segments": ..., "stages": ...}``;
    ``task`` and its settings ``config`` (its Config; None: the defaults) as :func:`load_stage`."""
    from dtp_ds.models import trunks
    from dtp_ds.train.seqcomp_schedule import cost_of, load_costs

    table = load_costs(costs_path) if costs_path else {}
    if replicates is None:
        replicates = default_replicates(batches)
    if NONE not in strategies:
        strategies = [NONE, *strategies]
    stages, name0, data = [], None, None
    for i, spec in enumerate(checkpoints):
        built, name, step = load_stage(spec, task, config, seed)
        if name0 is None:
            name0 = name
            data = load_batches(train_data, built, global_batch, batches, seed)
        elif name != name0:
            raise ValueError(f"{spec}: model {name}, the first stage's is {name0}: give one pilot run's checkpoints")
        found = trunks(built.module)
        if not found:
            raise ValueError(f"{spec}: model {name} has no dtp_ds image trunk for seqcomp (open_clip's own ViT has "
                             f"none); use e.g. PatchStem-ViT-Tiny-8 or a DRIP model")
        trunk_patch = found[0].patch_size
        cs, sources = [], []
        for s in strategies:
            c = 1.0 if s.is_identity(trunk_patch) else cost_of(table, s, trunk_patch)
            sources.append("identity" if s.is_identity(trunk_patch) else ("table" if c is not None else "flops_est"))
            if c is None:
                c = image_tower_cost(found[0], s)
                log.warning("%s: not in the cost table%s; using the image tower's FLOP estimate %.3f (it leaves out "
                            "the text tower and the heads: seqcomp looks cheaper than it is)", s.describe(),
                            f" {costs_path}" if costs_path else "", c)
            cs.append(c)
        est = estimate_stage(built.module, strategies, cs, data, replicates, seed)
        stages.append({"checkpoint": spec, "step": step, "strategies": [
            {"strategy": s.describe(), "r": s.rate, "p": s.patch, "cost": c, "cost_source": src, "groups": e}
            for s, c, src, e in zip(strategies, cs, sources, est)]})
        if progress:
            best = min(stages[-1]["strategies"], key=lambda r: r["groups"]["total"]["camse"])
            print(f"seqcomp_schedule: stage {i + 1}/{len(checkpoints)} ({spec}, step {step}): least CA-MSE "
                  f"{best['strategy']}", flush=True)
        del built
    if fractions is None:
        steps = [st["step"] for st in stages]
        if all(s is not None for s in steps) and max(steps) > 0:
            fractions = [s / max(steps) for s in steps]
        else:
            fractions = [i / max(1, len(stages) - 1) for i in range(len(stages))]
    if len(fractions) != len(stages) or list(fractions) != sorted(fractions):
        raise ValueError(f"--fractions {list(fractions)}: one per checkpoint, ascending")
    for st, f in zip(stages, fractions):
        st["fraction"] = f
    cands = [[Candidate(SeqComp(r["r"], r["p"]), r["cost"], r["groups"]["total"]["camse"],
                        r["groups"]["total"]["se"]) for r in st["strategies"]] for st in stages]
    chosen = choose_all(cands, monotone)
    for st, cs_, c in zip(stages, cands, chosen):
        for r, cand in zip(st["strategies"], cs_):
            r["chosen"] = cand is c
        st["chosen"] = c.strategy.describe()
    return {"segments": schedule_segments(fractions, chosen, final_fraction), "model": name0, "task": task,
            "global_batch": global_batch, "batches": batches, "replicates": replicates, "monotone": monotone,
            "final_fraction": final_fraction, "cost_table": costs_path, "seed": seed, "stages": stages}


def write_outputs(result: dict[str, Any], out: str) -> list[str]:
    """``out`` (the schedule JSON), ``out``'s ``.md`` and ``.png``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    stem = out[: -len(".json")] if out.endswith(".json") else out
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, stem + ".png")
    return [out, stem + ".md", stem + ".png"]


def main(argv: Iterable[str] | None = None) -> int:
    from dtp_ds.seqcomp.costs import add_task_args, patch_arg, strategy_grid, task_config

    p = argparse.ArgumentParser(prog="seqcomp_schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="one per stage, in training order: run dir, checkpoints/step_N, *.safetensors or init:MODEL")
    add_task_args(p)
    p.add_argument("--train-data", required=True,
                   help="shards the task's data stage reads, e.g. 'data/synth/train/{00000..00039}.tar' (clip) or "
                        "'data/synth/classify/train/{00000..00019}.tar' (an SSL task: any images)")
    p.add_argument("--global-batch", type=int, default=64, help="the batch the gradients are taken at")
    p.add_argument("--batches", type=int, default=10,
                   help="K batches per stage (>= 2; 10 or more: the standard error has 4 degrees of freedom)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--patches", type=patch_arg, nargs="+", default=[None], help="'stored' or sizes")
    p.add_argument("--costs", help="the cost table of tools/seqcomp_costs (JSON)")
    p.add_argument("--fractions", type=float, nargs="+",
                   help="each checkpoint's fraction of training (default: its step over the last one's)")
    p.add_argument("--replicates", type=int,
                   help="batch groups for the standard error (default: BATCHES // 2, at most 5)")
    p.add_argument("--monotone", action="store_true", help="no later stage picks a cheaper strategy")
    p.add_argument("--final-fraction", type=float, default=0.1,
                   help="the last fraction of training on the full sequence (0: the last stage's choice to the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="logs/seqcomp_schedule.json")
    a, rest = p.parse_known_args(list(argv) if argv is not None else None)
    try:
        config = task_config(a.task, rest)
    except ValueError as e:
        p.error(str(e))
    result = run(a.checkpoints, a.train_data, strategy_grid(a.rates, a.patches), a.global_batch, a.batches, a.costs,
                 a.fractions, a.replicates, a.monotone, a.final_fraction, a.seed, task=a.task, config=config)
    files = write_outputs(result, a.out)
    print(markdown(result))
    from dtp_ds.train.seqcomp_schedule import load_schedule

    segs = load_schedule(files[0])
    print("seqcomp_schedule: --seqcomp-schedule " + files[0] + " = '" + ";".join(s.describe() for s in segs)
          + "'; wrote " + ", ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
